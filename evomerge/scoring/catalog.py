"""Task names -> lm-eval TaskManager, and the metrics each task reports, without a model.

Only our include paths are indexed unless a name is not found there: indexing lm-eval's ~15k
built-in tasks takes tens of seconds, so it happens only when a built-in task is asked for.
Metrics are read from the task YAMLs (metric_list, filter_list, aggregate_metric_list), so a
study config is checked in a second, before any model or dataset is loaded. lm-eval's index
entries, YAML loader and metric registry are read through `lm_eval_adapter.index`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import MissingPathError, TaskError
from evomerge.objective import TaskMetrics
from evomerge.registry import did_you_mean
from evomerge.scoring.config import ScoringSettings
from evomerge.scoring.lm_eval_adapter import index

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

    from evomerge.scoring.lm_eval_adapter.tasks import GroupFacts, TaskFacts

_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}
_GROUP_FIELDS = {"group", "group_alias", "task", "aggregate_metric_list", "metadata", "tag"}


def metric_key(metric: str, filter_name: str) -> str:
    """lm-eval's 'acc,none' is our 'acc'; any other filter stays: 'exact_match,strict-match'."""
    return metric if filter_name == "none" else f"{metric},{filter_name}"


def normalize_metrics(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's {task: {'acc,none': x, 'acc_stderr,none': 'N/A', ...}} -> {task: {'acc': x}};
    entries without any metric (groups that do not aggregate) are left out."""
    out: dict[str, dict[str, float]] = {}
    for name, res in results.items():
        metrics = {}
        for k, v in res.items():
            if "," not in k or "_stderr," in k:
                continue
            metric, filter_key = k.split(",", 1)
            try:
                metrics[metric_key(metric, filter_key)] = float(v)
            except (TypeError, ValueError):
                continue
        if metrics:
            out[name] = metrics
    return out


def task_manager(include_paths: tuple[str, ...], with_builtins: bool) -> TaskManager:
    """One TaskManager per (paths, builtins) per process (the built-in index is slow to build);
    rebuilt when a YAML under the include paths is added, removed or edited."""
    stamp = tuple(
        (str(f), f.stat().st_mtime_ns)
        for p in include_paths
        for f in sorted(Path(p).glob("**/*.y*ml"))
        if f.is_file()
    )
    return _task_manager(include_paths, with_builtins, stamp)


@functools.lru_cache(maxsize=4)
def _task_manager(include_paths: tuple[str, ...], with_builtins: bool, stamp: tuple) -> TaskManager:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None, include_defaults=with_builtins)


def check_include_paths(paths: tuple[str, ...]) -> tuple[str, ...]:
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_dir():
            what = "is not a folder" if path.exists() else "does not exist"
            raise MissingPathError(f"task include path {p} {what}; pass a folder of task YAMLs")
        out.append(str(path.resolve()))
    return tuple(out)


def _is_yaml_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).expanduser().is_file()


def resolve_tasks(config: ScoringSettings) -> TaskManager:
    """A TaskManager that knows every name in `config.tasks`, or TaskError naming the unknown."""
    paths = check_include_paths(config.include_paths)
    tm = task_manager(paths, False)
    missing = [t for t in config.tasks if t not in tm.task_index and not _is_yaml_path(t)]
    if missing and any(t in index.builtin_yaml_text() for t in missing):
        tm = task_manager(paths, True)
        missing = [t for t in missing if t not in tm.task_index]
    if missing:
        name = missing[0]
        hint = did_you_mean(name, [*tm.all_tasks, *index.builtin_names()], n=3)
        where = f"include paths {', '.join(paths)} and " if paths else ""
        raise TaskError(
            f"unknown task {name!r}{hint} (searched {where}lm-eval's built-in tasks)"
            + _broken_yaml_note(paths)
        )
    return tm


def _broken_yaml_note(paths: tuple[str, ...]) -> str:
    """lm-eval skips a YAML that fails to parse at debug level; say so where a task is missing."""
    broken = []
    for root in paths:
        for f in sorted(Path(root).glob("**/*.y*ml")):
            exc = index.index_error(f)
            if exc is not None:
                broken.append(f"{f}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    if not broken:
        return ""
    more = f" and {len(broken) - 2} more" if len(broken) > 2 else ""
    return "; these task YAMLs failed to load: " + "; ".join(broken[:2]) + more


def metrics_of_task_cfg(name: str, cfg: Mapping[str, Any]) -> TaskMetrics:
    """Metric keys a task YAML makes lm-eval report, in filter-then-metric_list order."""
    _check_data_files(name, cfg)
    metric_list = cfg.get("metric_list")
    if metric_list is None:
        output_type = cfg.get("output_type", "generate_until")
        pairs = [(m, index.higher_is_better(m)) for m in index.default_metrics(output_type)]
    else:
        pairs = [
            (
                str(mc["metric"]),
                mc.get("higher_is_better", index.higher_is_better(str(mc["metric"]))),
            )
            for mc in metric_list
            if isinstance(mc, Mapping) and "metric" in mc
        ]
    return TaskMetrics(name, *_keys(pairs, _filter_names(cfg.get("filter_list"))))


def _filter_names(filter_list: Any) -> list[str]:
    if isinstance(filter_list, list):
        names = [f["name"] for f in filter_list if isinstance(f, Mapping) and "name" in f]
        if names:
            return names
    return ["none"]


def _keys(pairs: list[tuple[str, bool | None]], filters: list[str]) -> tuple[dict, str | None]:
    hib = {metric_key(m, f): (None if h is None else bool(h)) for f in filters for m, h in pairs}
    return hib, next(iter(hib), None)


def group_metrics(
    name: str, aggregates: list[tuple[str, list[str] | None]], leaves: list[TaskMetrics]
) -> TaskMetrics:
    """Keys a group reports from its aggregate_metric_list: (metric, filter_list or discover)."""
    hib: dict[str, bool | None] = {}
    for metric, filters in aggregates:
        if filters is None:  # lm-eval discovers the filters its children used for the metric
            found = {
                k.split(",", 1)[1] if "," in k else "none"
                for leaf in leaves
                for k in leaf.higher_is_better
                if k.split(",", 1)[0] == metric
            }
            filters = sorted(found) or ["none"]
        for f in filters:
            key = metric_key(metric, f)
            known = [
                leaf.higher_is_better[key]
                for leaf in leaves
                if leaf.higher_is_better.get(key) is not None
            ]
            hib[key] = known[0] if known else index.higher_is_better(metric)
    return TaskMetrics(name, hib, next(iter(hib), None))


def _check_data_files(name: str, cfg: Mapping[str, Any]) -> None:
    """Local data files named in a task YAML must exist (and be absolute: see FACTS.md)."""
    if cfg.get("dataset_path") not in _LOCAL_BUILDERS:
        return
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, Mapping):
        files = list(files.values())
    for f in files if isinstance(files, list) else [files]:
        for p in f if isinstance(f, list) else [f]:
            if isinstance(p, str) and "://" not in p and "*" not in p and not Path(p).is_file():
                raise MissingPathError(
                    f"task {name!r}: data file {p} does not exist (dataset_kwargs.data_files); "
                    "use an absolute path"
                )


def _leaves(
    tm: TaskManager, cfg: Mapping[str, Any], overrides: Mapping[str, Any]
) -> Iterator[TaskMetrics]:
    """Leaf tasks of a group config, with the group's task-level overrides applied."""
    overrides = {**overrides, **{k: v for k, v in cfg.items() if k not in _GROUP_FIELDS}}
    members = cfg.get("task")
    for item in members if isinstance(members, list) else [members]:
        if isinstance(item, Mapping) and "group" in item:
            base = index.indexed(tm, item["group"])
            sub = {**base.cfg, **item} if base is not None else dict(item)
            yield from _leaves(tm, sub, overrides)
        elif isinstance(item, (str, Mapping)):
            task = item if isinstance(item, str) else str(item.get("task"))
            extra = {} if isinstance(item, str) else dict(item)
            if task not in tm.task_index:
                yield metrics_of_task_cfg(task, {**overrides, **extra})
                continue
            sub = index.entry(tm, task)
            if sub.kind == "GROUP":
                yield from _leaves(tm, sub.cfg, {**overrides, **extra})
            elif sub.kind == "TAG":
                for t in sorted(sub.tags):
                    yield metrics_of_task_cfg(t, {**index.entry(tm, t).cfg, **overrides, **extra})
            else:
                yield metrics_of_task_cfg(task, {**sub.cfg, **overrides, **extra})


def aggregates_of(cfg_list: Any) -> list[tuple[str, list[str] | None]]:
    """(metric, filter_list) of a group's aggregate_metric_list (one entry or a list)."""
    items = cfg_list if isinstance(cfg_list, list) else [cfg_list] if cfg_list else []
    out = []
    for a in items:
        metric = a.get("metric") if isinstance(a, Mapping) else None
        filters = a.get("filter_list") if isinstance(a, Mapping) else None
        if metric:
            out.append((str(metric), [filters] if isinstance(filters, str) else filters))
    return out


def describe_tasks(config: ScoringSettings) -> dict[str, TaskMetrics]:
    """Reported name -> metrics, for every requested name: a task is itself, a tag its tasks,
    a group itself when it aggregates (else its leaf tasks). Raises TaskError/MissingPathError."""
    tm = resolve_tasks(config)
    out: dict[str, TaskMetrics] = {}
    for name in config.tasks:
        entry = index.entry(tm, name)
        if entry.kind == "TAG":
            for t in sorted(entry.tags):
                out[t] = metrics_of_task_cfg(t, index.entry(tm, t).cfg)
        elif entry.kind == "GROUP":
            leaves = list(_leaves(tm, entry.cfg, {}))
            aggs = aggregates_of(entry.cfg.get("aggregate_metric_list"))
            if aggs:
                out[entry.name] = group_metrics(entry.name, aggs, leaves)
            else:
                out.update({leaf.task: leaf for leaf in leaves})
        else:
            out[entry.name] = metrics_of_task_cfg(entry.name, entry.cfg)
    return out


def metrics_of_built(
    tasks: Iterable[TaskFacts], groups: Iterable[GroupFacts]
) -> dict[str, TaskMetrics]:
    """Name -> metrics of built tasks, then of their groups (children first, as aggregated):
    what the scorer reports, read from lm-eval's objects instead of the YAMLs."""
    built = {
        t.name: TaskMetrics(t.name, *_keys(list(t.higher_is_better), _filter_names(t.filter_list)))
        for t in tasks
    }
    for g in groups:
        leaves = [built[n] for n in g.leaves if n in built]
        built[g.name] = group_metrics(g.name, aggregates_of(g.aggregate_metric_list), leaves)
    return built


def check_tasks(config: ScoringSettings) -> dict[str, list[str]]:
    """Task -> the metric keys it reports; raises on unknown tasks or missing paths/data files.

    Needs no model: run it when a study config is loaded, before anything expensive.
    """
    return {name: list(info.higher_is_better) for name, info in describe_tasks(config).items()}

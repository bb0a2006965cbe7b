"""The datasets behind lm-eval tasks, for `evomerge fetch`: which each task reads (from the
index, nothing loaded) and loading them, which fills the HF datasets cache as a study would.

Building a task is what downloads its data: `TaskManager.load` constructs each leaf task, and
`ConfigurableTask.__init__` calls `download()`, i.e. `datasets.load_dataset(path=DATASET_PATH,
name=DATASET_NAME, **dataset_kwargs)`, or the task's `custom_dataset` function (local data).
A task built here and one built by a study's scorer read the same cache entry.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.scoring.lm_eval_adapter import index

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

# datasets' packaged builders: files on this machine, nothing to download
LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas", "webdataset"})


@dataclass(frozen=True)
class TaskData:
    """One leaf task's dataset: `dataset` is dataset_path (dataset_name), or the custom loader,
    `local` when nothing comes from the hub, `docs` the evaluation documents once loaded."""

    task: str
    dataset: str
    local: bool
    docs: int | None = None


def _data(task: str, path: Any, name: Any, custom: Any, docs: int | None = None) -> TaskData:
    if custom is not None and not path:
        # a built task holds the function, the index its `!function module.attr` string
        where = (
            f"{Path(getattr(custom, '__module__', '') or '').name}.{custom.__name__}".lstrip(".")
            if callable(custom)
            else Path(str(custom)).name
        )
        return TaskData(task, f"custom_dataset {where}", True, docs)
    shown = f"{path} ({name})" if name else str(path)
    local = path in LOCAL_BUILDERS or (isinstance(path, str) and Path(path).expanduser().exists())
    return TaskData(task, shown, bool(local or custom is not None), docs)


def planned(tm: TaskManager, names: Sequence[str]) -> list[TaskData]:
    """The leaf tasks of `names` (tasks, groups, tags) with the dataset each names, read from the
    index alone (`--dry-run`): nothing is built or loaded."""
    seen: dict[str, TaskData] = {}
    for name in names:
        for data in _walk(tm, name, {}):
            seen.setdefault(data.task, data)
    return list(seen.values())


def _walk(tm: TaskManager, name: str, overrides: Mapping[str, Any]) -> Iterator[TaskData]:
    entry = index.entry(tm, name)
    if entry.kind == "TAG":
        for t in sorted(entry.tags):
            yield from _walk(tm, t, overrides)
    elif entry.kind == "GROUP":
        members = entry.cfg.get("task")
        for item in members if isinstance(members, list) else [members]:
            if isinstance(item, str):
                yield from _walk(tm, item, overrides)
            elif isinstance(item, Mapping) and isinstance(item.get("task"), str):
                extra = {**overrides, **item}
                if item["task"] in tm.task_index:
                    yield from _walk(tm, item["task"], extra)
                else:  # a task defined inline in the group
                    yield _data(item["task"], *_source(extra))
    else:
        yield _data(entry.name, *_source({**entry.cfg, **overrides}))


def _source(cfg: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    return cfg.get("dataset_path"), cfg.get("dataset_name"), cfg.get("custom_dataset")


def load(tm: TaskManager, name: str) -> list[TaskData]:
    """Build `name`'s tasks (downloading what the HF datasets cache lacks, unless offline) and
    say what each read. Raises TaskError naming the task when a dataset cannot be had."""
    from evomerge.scoring.lm_eval_adapter.tasks import TaskSuite

    suite = TaskSuite(tm, [name])
    out = []
    for task_name, task in suite.tasks.items():
        # ConfigurableTask: config.dataset_path / dataset_name / custom_dataset; a Python task
        # (PY_TASK) has the class attributes DATASET_PATH / DATASET_NAME
        cfg = getattr(task, "config", None)
        path = getattr(cfg, "dataset_path", None) or getattr(task, "DATASET_PATH", None)
        ds_name = getattr(cfg, "dataset_name", None) or getattr(task, "DATASET_NAME", None)
        custom = getattr(cfg, "custom_dataset", None)
        out.append(_data(task_name, path, ds_name, custom, len(task.eval_docs)))
    return out

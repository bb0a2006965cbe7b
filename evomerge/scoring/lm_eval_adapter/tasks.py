"""lm-eval's `evaluator.evaluate`, split into build-once (`TaskSuite`) and run-per-candidate.

`evaluate` (lm-eval 0.4.13), per call: checks each task (UNSAFE_CODE, MULTIMODAL), takes
`get_sample_size(task, limit)` docs, `task.build_all_requests(...)`, runs the instances through
`getattr(lm, request_type)` (`repeats` copies each), `task.apply_filters()`, then per filter
and per doc `task.process_results(doc, filtered responses)`, aggregates each metric with
`task.aggregation()[metric]` (`lm_eval.api.metrics.mean` where none is named) and each group
with `Group.aggregate(results)`, children before parents. `simple_evaluate` first applies its
overrides per task (`set_config(num_fewshot)`, `set_fewshot_seed`). `TaskSuite` does the
overrides and the requests once, and the rest on every `run` + `aggregate`, in that order, so
the numbers are simple_evaluate's (tests/test_scoring.py compares them).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import TYPE_CHECKING, Any

from evomerge.errors import TaskError
from evomerge.scoring.config import ScoringSettings
from evomerge.scoring.lm_eval_adapter.runtime import without_custom_dataset_hint

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager


@dataclass(frozen=True)
class TaskFacts:
    """What a built task says of its metrics: `Task.higher_is_better()` items in order, and its
    config's filter_list (None, or the YAML's list of {name: ...})."""

    name: str
    higher_is_better: tuple[tuple[str, Any], ...]
    filter_list: Any


@dataclass(frozen=True)
class GroupFacts:
    """A built group: its aggregate_metric_list as plain dicts, and its leaf task names."""

    name: str
    aggregate_metric_list: list[dict[str, Any]]
    leaves: tuple[str, ...]


#: Items (documents) to score: task name -> indices into that task's documents, in the task's
#: own document order. None means every document of every task.
Subset = Mapping[str, Sequence[int]]


@dataclass
class _SubsetRequests:
    """The requests of a subset of the documents, built once per subset (racing rungs)."""

    docs: dict[str, list[tuple[Any, list[Any]]]]
    instances: dict[str, list[Any]]  # per task, for its filters
    by_type: dict[str, list[Any]]
    ll_tokens: list = dataclass_field(default_factory=list)


class TaskSuite:
    """The tasks and groups of one scorer, with every request built once."""

    def __init__(self, tm: TaskManager, names: Sequence[str]) -> None:
        # TaskManager.load(names) -> {"tasks": {task_name: Task}, "groups": {name: Group}}
        try:
            with without_custom_dataset_hint():
                loaded = tm.load(list(names))
        except Exception as exc:  # datasets and task code raise anything; report it in one line
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise TaskError(
                f"tasks {', '.join(names)} could not be built: {type(exc).__name__}: {msg}"
            ) from exc
        self.tasks: dict[str, Any] = dict(loaded["tasks"])
        self._groups = _bottom_up(dict(loaded.get("groups") or {}))

    # ------------------------------------------------------------------ build (once)
    def build(self, lm: Any, settings: ScoringSettings) -> None:
        """simple_evaluate's per-task overrides, then every request and its tokens."""
        for name, task in self.tasks.items():
            _configure(name, task, settings)
        self._build_requests(lm, settings)

    def _build_requests(self, lm: Any, settings: ScoringSettings) -> None:
        chat = bool(settings.apply_chat_template)
        by_type: dict[str, list[Any]] = defaultdict(list)
        self._docs: dict[str, list[tuple[Any, list[Any]]]] = {}
        self._instances: list[Any] = []
        for name, task in self.tasks.items():
            limit = _sample_size(task, settings.limit)
            # Task.build_all_requests as evaluate() calls it on one rank
            task.build_all_requests(
                limit=limit,
                rank=0,
                world_size=1,
                apply_chat_template=chat,
                fewshot_as_multiturn=chat,
                chat_template=lm.apply_chat_template if chat else None,
                tokenizer_name=lm.tokenizer_name if chat else "",
            )
            per_doc: dict[int, list[Any]] = defaultdict(list)
            for inst in task.instances:  # Instance: doc_id, idx, request_type, repeats, args
                per_doc[inst.doc_id].append(inst)
                by_type[inst.request_type].extend([inst] * inst.repeats)
            self._docs[name] = [
                (doc, sorted(per_doc[doc_id], key=lambda i: i.idx))
                for doc_id, doc in task.doc_iterator(rank=0, limit=limit, world_size=1)
            ]
            self._instances.extend(task.instances)
            _memoize_doc_fields(task, [doc for doc, _ in self._docs[name]])
        self._requests = dict(by_type)
        ll = self._requests.get("loglikelihood")
        self.ll_tokens: list = lm.tokenize_loglikelihood(ll) if ll else []
        for inst, (_, context, continuation) in zip(ll or [], self.ll_tokens, strict=True):
            if not context or not continuation:  # lm-eval would assert on every candidate
                raise TaskError(
                    f"task {inst.task_name!r}: request {repr(inst.args)[:160]} tokenizes to an empty "
                    "context or continuation; check the task's target_delimiter and the tokenizer"
                )

    # ------------------------------------------------------------------ per candidate
    def doc_counts(self) -> dict[str, int]:
        """Documents (items) of each task, as `run` and `item_values` index them."""
        return {name: len(docs) for name, docs in self._docs.items()}

    def reset(self) -> None:
        """Forget the previous candidate's responses (Instance.resps, filtered_resps)."""
        for inst in self._instances:
            inst.resps = []
            inst.filtered_resps = {}

    def run(self, lm: Any, subset: Subset | None = None) -> None:
        """Run the requests of every document, or of `subset`'s, on the model's current
        weights, after `reset()`."""
        if subset is None:
            requests, ll_tokens = self._requests, self.ll_tokens
        else:
            part = self._subset(lm, subset)
            requests, ll_tokens = part.by_type, part.ll_tokens
        for req_type, reqs in requests.items():
            if req_type == "loglikelihood":
                resps = lm.run_loglikelihood(ll_tokens)
            else:  # LM.generate_until / loglikelihood_rolling(instances, disable_tqdm)
                resps = getattr(lm, req_type)(reqs, disable_tqdm=True)
            for resp, req in zip(resps, reqs, strict=True):
                req.resps.append(resp)

    def _subset(self, lm: Any, subset: Subset) -> _SubsetRequests:
        """The requests of `subset`, in the full run's order, with their own log-likelihood plan
        (cached: a racing study asks for the same few subsets on every candidate)."""
        key = _subset_key(subset)
        cache: dict[tuple, _SubsetRequests] = self.__dict__.setdefault("_subsets", {})
        if key in cache:
            return cache[key]
        if lm is None:
            raise RuntimeError("aggregate(subset) before run(lm, subset)")
        unknown = sorted(set(subset) - set(self._docs))
        if unknown:
            raise TaskError(f"items of unknown tasks {unknown} (scored: {', '.join(self._docs)})")
        docs = {name: [self._docs[name][i] for i in idx] for name, idx in subset.items()}
        chosen = {id(inst) for pairs in docs.values() for _, insts in pairs for inst in insts}
        by_type = {
            t: [inst for inst in reqs if id(inst) in chosen] for t, reqs in self._requests.items()
        }
        by_type = {t: reqs for t, reqs in by_type.items() if reqs}
        tokens: list = []
        ll = self._requests.get("loglikelihood") or []
        if "loglikelihood" in by_type:
            # the full run's tokens for the chosen instances ([inst] * repeats kept in order)
            tokens = [
                tok for inst, tok in zip(ll, self.ll_tokens, strict=True) if id(inst) in chosen
            ]
            lm.plan_loglikelihood(tokens)
        part = _SubsetRequests(
            docs=docs,
            instances={n: [i for _, insts in pairs for i in insts] for n, pairs in docs.items()},
            by_type=by_type,
            ll_tokens=tokens,
        )
        cache[key] = part
        return part

    def item_values(self, subset: Subset | None = None) -> dict[str, dict[str, list[float]]]:
        """Per task, per raw metric key ("acc,none"), each scored document's own value (lm-eval's
        per-sample metric), in the order of the documents scored; from the last `aggregate`."""
        return {
            name: {f"{m},{f}": values for (m, f), values in per.items() if _numeric(values)}
            for name, per in self._last_items.items()
        }

    def aggregate(self, subset: Subset | None = None) -> dict[str, dict[str, Any]]:
        """lm-eval's results dict ({name: {"acc,none": x, "sample_len": n, ...}}): filters,
        process_results per doc, then evaluator_utils._compute_task_aggregations (with
        bootstrap_iters=0: stderr "N/A"; the most values of any metric as sample_len), then
        the groups. With `subset`, over its documents only (and no groups)."""
        from lm_eval.api.metrics import mean

        raw: dict[str, dict[str, Any]] = {}
        part = None if subset is None else self._subset(None, subset)
        self._last_items: dict[str, dict[tuple[str, str], list[Any]]] = {}
        for name, task in self.tasks.items():
            if part is None:
                docs = self._docs[name]
                task.apply_filters()
            elif part.docs.get(name):
                docs = part.docs[name]
                # Task.apply_filters runs Task._filters (FilterEnsembles) over all of the
                # task's instances; the unscored ones have no responses, so apply them to
                # the subset's instances only (FilterEnsemble.apply(instances))
                for ensemble in getattr(task, "_filters", []):
                    ensemble.apply(part.instances[name])
            else:
                continue
            items: dict[tuple[str, str], list[Any]] = defaultdict(list)
            for filter_key in docs[0][1][0].filtered_resps:
                for doc, reqs in docs:
                    result = task.process_results(doc, [r.filtered_resps[filter_key] for r in reqs])
                    for metric, value in result.items():
                        items[(metric, filter_key)].append(value)
            self._last_items[name] = items
            agg = task.aggregation()
            res: dict[str, Any] = {"sample_len": max((len(v) for v in items.values()), default=0)}
            for (metric, filter_key), values in items.items():
                res[f"{metric},{filter_key}"] = agg.get(metric, mean)(values)
                res[f"{metric}_stderr,{filter_key}"] = "N/A"
            raw[name] = res
        if part is None:
            for g in self._groups:
                raw[g.name] = g.aggregate(raw)  # Group.aggregate(task results) -> its results
        return raw

    def samples(self, raw: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
        """Docs scored per task, from an `aggregate()` result."""
        return {n: int(raw[n].get("sample_len", 0)) for n in self.tasks if n in raw}

    # ------------------------------------------------------------------ metadata
    def task_facts(self) -> list[TaskFacts]:
        return [
            TaskFacts(
                t.task_name,
                tuple((t.higher_is_better() or {}).items()),
                getattr(t.config, "filter_list", None),
            )
            for t in self.tasks.values()
        ]

    def group_facts(self) -> list[GroupFacts]:
        """Groups children first, as they aggregate."""
        return [
            GroupFacts(
                g.name,
                _plain_aggregates(g.aggregate_metric_list),
                tuple(t.task_name for t in g.get_all_tasks()),
            )
            for g in self._groups
        ]


def _subset_key(subset: Subset) -> tuple:
    return tuple(sorted((name, tuple(int(i) for i in idx)) for name, idx in subset.items()))


def _numeric(values: list[Any]) -> bool:
    """Per-sample values that are plain numbers (acc, exact_match); corpus metrics such as f1 or
    bleu keep (reference, prediction) pairs per document, which are not item scores."""
    return all(isinstance(v, (int, float)) and not isinstance(v, complex) for v in values)


def _configure(name: str, task: Any, settings: ScoringSettings) -> None:
    """simple_evaluate's overrides: num_fewshot (a task pinned to 0 keeps 0), the few-shot seed;
    and evaluate()'s refusals (UNSAFE_CODE, MULTIMODAL), as errors of ours."""
    if getattr(task, "UNSAFE_CODE", False):
        raise TaskError(f"task {name!r} executes model-written code; evomerge does not run it")
    if getattr(task, "MULTIMODAL", False):
        raise TaskError(f"task {name!r} is multimodal; the scorer supports text models only")
    n = settings.num_fewshot
    if n is not None:
        if task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=n)
    elif task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=settings.fewshot_seed)


def _sample_size(task: Any, limit: int | float | None) -> int | None:
    """lm_eval.evaluator_utils.get_sample_size: a fraction < 1 of `task.eval_docs` (rounded
    up), else the first N."""
    from lm_eval.evaluator_utils import get_sample_size

    return get_sample_size(task, limit)


def _bottom_up(groups: dict[str, Any]) -> list[Any]:
    """Groups with children before parents, as evaluator_utils.aggregate_groups orders them
    (a post-order walk over `Group.__iter__`, the direct children)."""
    from lm_eval.api.group import Group

    order: list[Any] = []
    seen: set[str] = set()

    def visit(g: Any) -> None:
        if g.name in seen:
            return
        for child in g:
            if isinstance(child, Group):
                visit(child)
        seen.add(g.name)
        order.append(g)

    for g in groups.values():
        visit(g)
    return order


def _plain_aggregates(aggs: Any) -> list[dict[str, Any]]:
    """Group.aggregate_metric_list (lm_eval.config.group.AggMetricConfig objects, or None) as
    {metric, filter_list} dicts, the shape a group YAML has."""
    items = aggs if isinstance(aggs, list) else [aggs] if aggs else []
    return [
        dict(a)
        if isinstance(a, Mapping)
        else {"metric": getattr(a, "metric", None), "filter_list": getattr(a, "filter_list", None)}
        for a in items
    ]


_DOC_FIELDS = ("doc_to_target", "doc_to_choice", "doc_to_text")


def _memoize_doc_fields(task: Any, docs: list[Any]) -> None:
    """Answer the task's per-doc template fields from a table built once.

    Why: `ConfigurableTask.process_results` renders doc_to_target / doc_to_choice for every doc
    on every call, and lm-eval's `utils.apply_template` compiles the Jinja template anew each
    time (`from_string` has no cache): on the demo zoo that was 0.03 s of a 0.2 s candidate.
    The fields depend on the doc only, never on the model. The table is keyed by the identity of
    the docs this suite holds (alive as long as it is); any other call goes to the task's own
    method. Relies on `task.config.<field>` being set where the task renders that field, and on
    the task calling these methods through the instance (so an instance attribute wins). Only
    this suite's task instances get the attribute; lm-eval's classes are untouched.
    """
    for field in _DOC_FIELDS:
        render = getattr(task, field, None)
        if render is None or not docs or getattr(task.config, field, None) is None:
            continue
        try:
            table = {id(doc): render(doc) for doc in docs}
        except Exception:  # a field the task does not define (e.g. no choices): leave it
            continue

        def memo(
            doc: Any, *args: Any, _render: Any = render, _table: dict = table, **kwargs: Any
        ) -> Any:
            if args or kwargs or id(doc) not in _table:
                return _render(doc, *args, **kwargs)
            return _table[id(doc)]

        setattr(task, field, memo)

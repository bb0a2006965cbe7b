"""The resident-model scorer: lm-eval's `evaluate()` split into build-once and run-per-candidate.

Built once per scorer: the TaskManager, the tasks and their datasets, every request (prompts,
few-shot contexts), the tokenized log-likelihood requests, and the HFLM wrapper around the
worker's model. Per candidate (`score()`): clear the responses, run the forward passes over the
cached requests, apply the task filters, compute per-document metrics and aggregate them, as
`lm_eval.evaluator.evaluate` does, so the numbers equal `simple_evaluate`'s on the same weights.
Nothing the model produced is cached: the weights change between calls.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from evomerge.errors import CandidateError, TaskError
from evomerge.objective import Objective, ObjectiveConfig, TaskMetrics
from evomerge.scoring.catalog import (
    _filter_names,
    _keys,
    aggregates_of,
    describe_tasks,
    group_metrics,
    normalize_metrics,
    resolve_tasks,
)
from evomerge.scoring.config import ScoreResult, ScoringConfig, warn_public_benchmarks
from evomerge.scoring.loglikelihood import LoglikelihoodPlan

if TYPE_CHECKING:
    import torch

# simple_evaluate's python and numpy seeds: building tasks draws the same numbers as it does
_PY_SEED, _NP_SEED = 0, 1234


@contextlib.contextmanager
def seeded(torch_seed: int, device: torch.device) -> Iterator[None]:
    """Seed python, numpy and torch as simple_evaluate does; restore the caller's RNG after,
    so scoring never shifts the optimizer's random stream."""
    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        random.seed(_PY_SEED)
        np.random.seed(_NP_SEED)
        torch.manual_seed(torch_seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class _NoCustomDatasetHint(logging.Filter):
    """Drops lm-eval's warning that every `custom_dataset` task prints when it loads ("Custom
    kwargs can be passed to `--metadata`..."): advice for its own CLI, noise for ours."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


@contextlib.contextmanager
def _without_custom_dataset_hint() -> Iterator[None]:
    log, hint = logging.getLogger("lm_eval.api.task"), _NoCustomDatasetHint()
    log.addFilter(hint)
    try:
        yield
    finally:
        log.removeFilter(hint)


@functools.cache
def _resident_lm_class() -> type:
    """HFLM that can hand back its tokenized log-likelihood requests instead of running them,
    so tokenization runs once per scorer through lm-eval's own code path."""
    from lm_eval.models.huggingface import HFLM

    class ResidentHFLM(HFLM):
        _capture: list | None = None

        _plan: LoglikelihoodPlan | None = None

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            if self._capture is not None:
                self._capture.extend(requests)
                return [(0.0, False)] * len(requests)
            if self._plan is not None and self._plan.requests is requests:
                return self._plan.run(self)
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)

        _encoded: dict | None = None

        def tok_batch_encode(
            self, strings, padding_side="left", left_truncate_len=None, truncation=False
        ):
            # generate_until encodes the same prompt batches for every candidate: once is enough
            # (the tensors are only read: moved to the device and passed to generate)
            key = (tuple(strings), padding_side, left_truncate_len, truncation)
            if self._encoded is None:
                self._encoded = {}
            if key not in self._encoded:
                self._encoded[key] = super().tok_batch_encode(
                    strings, padding_side, left_truncate_len, truncation
                )
            return self._encoded[key]

        def tokenize_loglikelihood(self, instances: list) -> list:
            self._capture = []
            try:
                self.loglikelihood(instances, disable_tqdm=True)
                requests = self._capture
            finally:
                self._capture = None
            self._plan = LoglikelihoodPlan.build(self, requests)
            return requests

    return ResidentHFLM


class _ForwardMeter:
    """Times the model's top-level forward calls during one score(), and notes non-finite logits
    (a NaN model otherwise scores as if it always picked choice 0)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.sync = device.type == "cuda"
        self.seconds = 0.0
        self.calls = 0
        self.finite: Any = None  # a 0-d bool tensor on the model's device
        self._t0 = 0.0

    def __enter__(self) -> _ForwardMeter:
        self._hooks = [
            self.model.register_forward_pre_hook(self._pre),
            self.model.register_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()

    def _pre(self, module: Any, args: Any) -> None:
        import torch

        if self.sync:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def _post(self, module: Any, args: Any, output: Any) -> None:
        import torch

        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, tuple) and output:
            logits = output[0]
        if isinstance(logits, torch.Tensor):
            # one fp32 reduction: any NaN/inf makes the sum non-finite; no sync, no bool copy
            ok = torch.isfinite(torch.sum(logits, dtype=torch.float32))
            self.finite = ok if self.finite is None else self.finite & ok
        if self.sync:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1


_DOC_FIELDS = ("doc_to_target", "doc_to_choice", "doc_to_text")


def _memoize_doc_fields(task: Any, docs: list[Any]) -> None:
    """Answer the task's per-doc template fields from a table built once.

    Why: `process_results` renders doc_to_target / doc_to_choice for every doc on every call,
    and lm-eval's `apply_template` compiles the Jinja template anew each time (`from_string`
    has no cache): on the demo zoo that was 0.03 s of a 0.2 s candidate. The fields depend on
    the doc only, never on the model. The table is keyed by the identity of the docs this scorer
    holds (alive as long as it is); any other call goes to the task's own method. Only this
    scorer's task instances get the attribute; lm-eval's classes are untouched.
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


def _device_of(model: Any) -> torch.device:
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _sample_size(task: Any, limit: int | float | None) -> int | None:
    """lm-eval's get_sample_size: a fraction < 1 of the docs (rounded up), else the first N."""
    if limit is None:
        return None
    return math.ceil(len(task.eval_docs) * limit) if limit < 1.0 else int(limit)


def _bottom_up(groups: dict[str, Any]) -> list[Any]:
    """Groups with children before parents, as lm-eval aggregates them."""
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


class Scorer:
    """Scores the resident model on fixed tasks; `score()` again after each weight swap."""

    def __init__(
        self, model: Any, tokenizer: Any, config: ScoringConfig, *, fitness: bool = True
    ) -> None:
        self.config = config
        self.model = model
        self.device = _device_of(model)
        yaml_info = describe_tasks(config)  # clean errors before anything is built
        if fitness:
            warn_public_benchmarks(yaml_info)
        tm = resolve_tasks(config)
        with seeded(config.seed, self.device):
            try:
                with _without_custom_dataset_hint():
                    loaded = tm.load(list(config.tasks))
            except Exception as exc:  # datasets and task code raise anything; report it in one line
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise TaskError(
                    f"tasks {', '.join(config.tasks)} could not be built: {type(exc).__name__}: {msg}"
                ) from exc
            self._tasks: dict[str, Any] = dict(loaded["tasks"])
            self._groups: dict[str, Any] = dict(loaded.get("groups") or {})
            with _quiet("lm_eval.models.huggingface"):
                self.lm = _resident_lm_class()(
                    pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size
                )
            for name, task in self._tasks.items():
                self._configure(name, task)
            self._build_requests()
        self._group_order = _bottom_up(self._groups)
        built = {name: self._task_info(t) for name, t in self._tasks.items()}
        for g in self._group_order:
            leaves = [built[t.task_name] for t in g.get_all_tasks() if t.task_name in built]
            built[g.name] = group_metrics(g.name, aggregates_of(g.aggregate_metric_list), leaves)
        self._catalog = {u: built.get(u, info) for u, info in yaml_info.items()}

    # ------------------------------------------------------------------ build (once)
    def _configure(self, name: str, task: Any) -> None:
        """simple_evaluate's per-task overrides: num_fewshot (a task pinned to 0 keeps 0), seed."""
        if getattr(task, "UNSAFE_CODE", False):
            raise TaskError(f"task {name!r} executes model-written code; evomerge does not run it")
        if getattr(task, "MULTIMODAL", False):
            raise TaskError(f"task {name!r} is multimodal; the scorer supports text models only")
        n = self.config.num_fewshot
        if n is not None:
            if task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=n)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=self.config.fewshot_seed)

    def _build_requests(self) -> None:
        chat = bool(self.config.apply_chat_template)
        by_type: dict[str, list[Any]] = defaultdict(list)
        self._docs: dict[str, list[tuple[Any, list[Any]]]] = {}
        self._instances: list[Any] = []
        for name, task in self._tasks.items():
            limit = _sample_size(task, self.config.limit)
            task.build_all_requests(
                limit=limit,
                rank=0,
                world_size=1,
                apply_chat_template=chat,
                fewshot_as_multiturn=chat,
                chat_template=self.lm.apply_chat_template if chat else None,
                tokenizer_name=self.lm.tokenizer_name if chat else "",
            )
            per_doc: dict[int, list[Any]] = defaultdict(list)
            for inst in task.instances:
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
        self._ll_tokens = self.lm.tokenize_loglikelihood(ll) if ll else []
        for inst, (_, context, continuation) in zip(ll or [], self._ll_tokens, strict=True):
            if not context or not continuation:  # lm-eval would assert on every candidate
                raise TaskError(
                    f"task {inst.task_name!r}: request {repr(inst.args)[:160]} tokenizes to an empty "
                    "context or continuation; check the task's target_delimiter and the tokenizer"
                )

    @staticmethod
    def _task_info(task: Any) -> TaskMetrics:
        hib = task.higher_is_better() or {}
        filters = _filter_names(getattr(task.config, "filter_list", None))
        return TaskMetrics(task.task_name, *_keys(list(hib.items()), filters))

    # ------------------------------------------------------------------ per candidate
    def score(self) -> ScoreResult:
        """Metrics of the model's current weights. CandidateError on NaN/inf or a failed forward."""
        t0 = time.perf_counter()
        for inst in self._instances:
            inst.resps = []
            inst.filtered_resps = {}
        meter = _ForwardMeter(self.model, self.device)
        t_lm = time.perf_counter()
        try:
            with meter, seeded(self.config.seed, self.device):
                for req_type, reqs in self._requests.items():
                    if req_type == "loglikelihood":
                        resps = self.lm._loglikelihood_tokens(self._ll_tokens, disable_tqdm=True)
                    else:
                        resps = getattr(self.lm, req_type)(reqs, disable_tqdm=True)
                    for resp, req in zip(resps, reqs, strict=True):
                        req.resps.append(resp)
        except Exception as exc:  # a broken candidate can fail anywhere in the model
            raise CandidateError(f"forward pass failed: {type(exc).__name__}: {exc}") from exc
        lm_seconds = time.perf_counter() - t_lm
        if meter.finite is not None and not bool(meter.finite):
            raise CandidateError("the model produced NaN or inf logits")
        raw = self._aggregate()
        metrics = self._finalize(raw)
        return ScoreResult(
            metrics=metrics,
            seconds=time.perf_counter() - t0,
            forward_seconds=meter.seconds,
            lm_seconds=lm_seconds,
            n_forward=meter.calls,
            samples={n: int(raw[n].get("sample_len", 0)) for n in self._tasks},
        )

    def _aggregate(self) -> dict[str, dict[str, Any]]:
        """lm-eval's post-processing: filters, process_results per doc, aggregation, groups."""
        from lm_eval.api.metrics import mean

        raw: dict[str, dict[str, Any]] = {}
        for name, task in self._tasks.items():
            task.apply_filters()
            items: dict[tuple[str, str], list[Any]] = defaultdict(list)
            for filter_key in task.instances[0].filtered_resps:
                for doc, reqs in self._docs[name]:
                    result = task.process_results(doc, [r.filtered_resps[filter_key] for r in reqs])
                    for metric, value in result.items():
                        items[(metric, filter_key)].append(value)
            agg = task.aggregation()
            res: dict[str, Any] = {"sample_len": max((len(v) for v in items.values()), default=0)}
            for (metric, filter_key), values in items.items():
                res[f"{metric},{filter_key}"] = agg.get(metric, mean)(values)
                res[f"{metric}_stderr,{filter_key}"] = "N/A"
            raw[name] = res
        for g in self._group_order:
            raw[g.name] = g.aggregate(raw)
        return raw

    @staticmethod
    def _finalize(raw: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
        metrics = normalize_metrics(raw)
        for name, values in metrics.items():
            for key, value in values.items():
                if not math.isfinite(value):
                    raise CandidateError(f"metric {name}/{key} is {value}")
        return metrics

    # ------------------------------------------------------------------ metadata
    @property
    def tasks(self) -> tuple[str, ...]:
        """Reported names: tasks, tag members, and groups that aggregate."""
        return tuple(self._catalog)

    def task_metrics(self) -> dict[str, TaskMetrics]:
        return dict(self._catalog)

    def primary_metrics(self) -> dict[str, tuple[str, bool]]:
        """Task -> (primary metric key, higher is better); the primary is metric_list's first."""
        out = {}
        for name, info in self._catalog.items():
            if info.primary is not None:
                hib = info.higher_is_better.get(info.primary)
                out[name] = (info.primary, True if hib is None else bool(hib))
        return out

    def validate(self, objective: ObjectiveConfig | None = None) -> Objective:
        """The objective over these tasks; TaskError if it names a task or metric not scored."""
        return Objective(objective or ObjectiveConfig(), self._catalog)

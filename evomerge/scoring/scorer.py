"""The resident-model scorer: lm-eval's `evaluate()` split into build-once and run-per-candidate.

Built once per scorer: the TaskManager, the tasks and their datasets, every request (prompts,
few-shot contexts), the tokenized log-likelihood requests, and the HFLM wrapper around the
worker's model. Per candidate (`score()`): clear the responses, run the forward passes over the
cached requests, apply the task filters, compute per-document metrics and aggregate them, as
`lm_eval.evaluator.evaluate` does, so the numbers equal `simple_evaluate`'s on the same weights.
Nothing the model produced is cached: the weights change between calls. How lm-eval is driven
(its internals) is `evomerge.scoring.lm_eval_adapter`; this module times, checks and reports.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from evomerge.errors import CandidateError
from evomerge.items import ItemScores
from evomerge.objective import Objective, ObjectiveConfig, TaskMetrics
from evomerge.scoring.catalog import (
    describe_tasks,
    metric_key,
    metrics_of_built,
    normalize_metrics,
    resolve_tasks,
)
from evomerge.scoring.config import ScoreResult, ScoringSettings, warn_public_benchmarks
from evomerge.scoring.lm_eval_adapter.model import resident_lm
from evomerge.scoring.lm_eval_adapter.runtime import seeded
from evomerge.scoring.lm_eval_adapter.tasks import Subset, TaskSuite

if TYPE_CHECKING:
    import torch


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


def device_of(model: Any) -> torch.device:
    """The device of the model's first parameter (cpu for a model without any)."""
    import torch

    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


class Scorer:
    """Scores the resident model on fixed tasks; `score()` again after each weight swap."""

    def __init__(
        self, model: Any, tokenizer: Any, config: ScoringSettings, *, fitness: bool = True
    ) -> None:
        self.config = config
        self.model = model
        self.device = device_of(model)
        yaml_info = describe_tasks(config)  # clean errors before anything is built
        if fitness:
            warn_public_benchmarks(yaml_info)
        tm = resolve_tasks(config)
        with seeded(config.seed, self.device):
            self.suite = TaskSuite(tm, config.tasks)
            self.lm = resident_lm(model, tokenizer, config.batch_size)
            self.suite.build(self.lm, config)
        built = metrics_of_built(self.suite.task_facts(), self.suite.group_facts())
        self._catalog = {u: built.get(u, info) for u, info in yaml_info.items()}

    # ------------------------------------------------------------------ per candidate
    @property
    def item_counts(self) -> dict[str, int]:
        """Items (documents) per task: what `score(subset)` indexes."""
        return self.suite.doc_counts()

    def score(self, subset: Subset | None = None) -> ScoreResult:
        """Metrics of the model's current weights, on every item or on `subset` (task ->
        document indices; racing's rungs), with each item's own values. CandidateError on
        NaN/inf or a failed forward."""
        t0 = time.perf_counter()
        self.suite.reset()
        meter = _ForwardMeter(self.model, self.device)
        t_lm = time.perf_counter()
        try:
            with meter, seeded(self.config.seed, self.device):
                self.suite.run(self.lm, subset)
        except Exception as exc:  # a broken candidate can fail anywhere in the model
            raise CandidateError(f"forward pass failed: {type(exc).__name__}: {exc}") from exc
        lm_seconds = time.perf_counter() - t_lm
        if meter.finite is not None and not bool(meter.finite):
            raise CandidateError("the model produced NaN or inf logits")
        raw = self.suite.aggregate(subset)
        metrics = self._finalize(raw)
        return ScoreResult(
            metrics=metrics,
            seconds=time.perf_counter() - t0,
            forward_seconds=meter.seconds,
            lm_seconds=lm_seconds,
            n_forward=meter.calls,
            samples=self.suite.samples(raw),
            items=self._items(subset),
        )

    def _items(self, subset: Subset | None) -> ItemScores:
        values = {
            task: {metric_key(*k.split(",", 1)): v for k, v in per.items()}
            for task, per in self.suite.item_values().items()
        }
        counts = self.suite.doc_counts()
        ids = {
            task: list(range(counts[task])) if subset is None else list(subset[task])
            for task in values
        }
        return ItemScores.from_lists(ids, values)

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

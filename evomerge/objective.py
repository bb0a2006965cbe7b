"""Fitness from task metrics: a weighted sum, or several objectives for multi-objective search.

Pure: no lm-eval import. What a task produces (metric keys, which way is better, the primary
metric) comes in as `TaskMetrics`, built by `evomerge.scoring` from the task configs, so a study
config can be checked before any model is loaded. Every objective value is to be *maximized*:
a metric where lower is better (perplexity, brier_score) enters with its sign flipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from evomerge.errors import CandidateError, TaskError

Direction = Literal["maximize", "minimize"]


@dataclass(frozen=True)
class TaskMetrics:
    """What one task (or group) reports: metric key -> higher_is_better, and its primary key.

    Keys are as `ScoreResult.metrics` spells them: `acc` for lm-eval's `acc,none`, and
    `exact_match,strict-match` where a filter other than `none` produced the value.
    `higher_is_better` is None where lm-eval does not know the direction.
    """

    task: str
    higher_is_better: Mapping[str, bool | None]
    primary: str | None


class MetricTerm(BaseModel):
    """One metric of one task in the objective."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: str = Field(description="task name, as listed in the scoring tasks")
    metric: str | None = Field(
        default=None,
        description="metric key (acc, exact_match,strict-match); default: the task's primary metric",
    )
    weight: float = Field(default=1.0, description="multiplier of the metric in the sum")
    direction: Direction | None = Field(
        default=None,
        description="maximize or minimize; default: what lm-eval says of the metric",
    )

    @field_validator("weight")
    @classmethod
    def _finite_weight(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"weight must be a finite number, got {v}")
        return v


class ObjectiveConfig(BaseModel):
    """Which metrics make the fitness; `multi` keeps them apart as separate objectives."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    metrics: list[MetricTerm] | None = Field(
        default=None,
        description="metric terms; default: every task's primary metric with weight 1",
    )
    multi: bool = Field(
        default=False,
        description="one objective per term (for NSGA-II) instead of their weighted sum",
    )

    @field_validator("metrics")
    @classmethod
    def _not_empty(cls, v: list[MetricTerm] | None) -> list[MetricTerm] | None:
        if v is not None and not v:
            raise ValueError("metrics is an empty list; leave it out to use the primary metrics")
        return v


@dataclass(frozen=True)
class ResolvedTerm:
    """A term with its metric key and sign fixed: contributes sign * weight * value."""

    task: str
    metric: str
    weight: float
    sign: int  # +1 maximize, -1 minimize

    @property
    def name(self) -> str:
        return f"{self.task}/{self.metric}"


def resolve_metric(task: str, metric: str, available: Mapping[str, object]) -> str:
    """The key of `available` that `metric` names: exact, `acc,none` for `acc`, or the only
    filtered variant (`exact_match` -> `exact_match,strict-match` when that is the only one)."""
    if metric in available:
        return metric
    if metric.endswith(",none") and metric[: -len(",none")] in available:
        return metric[: -len(",none")]
    if "," not in metric:
        variants = [k for k in available if k.split(",", 1)[0] == metric]
        if len(variants) == 1:
            return variants[0]
        if variants:
            raise TaskError(
                f"task {task!r}: metric {metric!r} is ambiguous; name one of {', '.join(variants)}"
            )
    raise TaskError(
        f"task {task!r} does not produce metric {metric!r} "
        f"(it produces: {', '.join(available) or 'nothing known'})"
    )


class Objective:
    """Turns `{task: {metric: value}}` into a tuple of values to maximize."""

    def __init__(self, config: ObjectiveConfig, catalog: Mapping[str, TaskMetrics]) -> None:
        self.config = config
        if config.metrics is None:
            specs = [MetricTerm(task=t) for t in catalog]
        else:
            specs = list(config.metrics)
        if not specs:
            raise TaskError("objective: no tasks to score; list at least one task")
        self.terms: tuple[ResolvedTerm, ...] = tuple(self._resolve(s, catalog) for s in specs)

    @staticmethod
    def _resolve(spec: MetricTerm, catalog: Mapping[str, TaskMetrics]) -> ResolvedTerm:
        info = catalog.get(spec.task)
        if info is None:
            raise TaskError(
                f"objective: task {spec.task!r} is not among the scored tasks "
                f"({', '.join(catalog)}); add it to the tasks or fix the name"
            )
        if spec.metric is None:
            if info.primary is None:
                raise TaskError(
                    f"objective: task {spec.task!r} has no known primary metric; "
                    "name the metric explicitly"
                )
            key = info.primary
        else:
            key = resolve_metric(spec.task, spec.metric, info.higher_is_better)
        if spec.direction is not None:
            higher = spec.direction == "maximize"
        else:
            hib = info.higher_is_better.get(key)
            if hib is None:
                raise TaskError(
                    f"objective: direction of {spec.task}/{key} is unknown; "
                    "set direction: maximize or minimize"
                )
            higher = bool(hib)
        return ResolvedTerm(spec.task, key, float(spec.weight), 1 if higher else -1)

    @property
    def n_objectives(self) -> int:
        return len(self.terms) if self.config.multi else 1

    @property
    def names(self) -> tuple[str, ...]:
        """One name per objective value (for tables and optimizer logs)."""
        if self.config.multi:
            return tuple(t.name for t in self.terms)
        return ("fitness",)

    def evaluate(self, scores: Mapping[str, Mapping[str, float]]) -> tuple[float, ...]:
        """Objective values (to maximize). NaN/inf or a missing metric fails the candidate."""
        values = []
        for t in self.terms:
            try:
                raw = float(scores[t.task][t.metric])
            except (KeyError, TypeError, ValueError):
                raise CandidateError(f"scores lack a numeric {t.name}") from None
            if not math.isfinite(raw):
                raise CandidateError(f"{t.name} is {raw}")
            values.append(t.sign * t.weight * raw)
        if self.config.multi:
            return tuple(values)
        total = math.fsum(values)
        if not math.isfinite(total):
            raise CandidateError(f"fitness is {total}")
        return (total,)

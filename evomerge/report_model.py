"""report.json as types: what `build_report` writes and what the cache, the tables and the model
card read back, so no reader indexes a dict by string keys.

DESIGN.md's contract: `heldout` and `search` are lists of rows `{name, kind, mean, tasks}`, `kind`
one of `KINDS`, `mean` the mean of the tasks' primary metrics. The models serialize to exactly
the keys, key order and values report.json has always had: keys that are optional there (a row's
`metrics` and `error`, the report's `seconds` and `cached`) are left out when unset, never
written as null, and options of the optimizer stay flat beside its name.
"""

from __future__ import annotations

import json
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer

REPORT_FORMAT = 1

Kind = Literal["evolved", "parent", "uniform", "task_arithmetic", "ties", "greedy_soup", "ensemble"]
KINDS: tuple[str, ...] = get_args(Kind)
Split = Literal["search", "heldout"]
Scores = dict[str, dict[str, float]]  # task -> metric -> value


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _omit(data: dict[str, Any], unset: dict[str, Any]) -> dict[str, Any]:
    """Drop the keys whose value is their 'unset' marker (report.json leaves them out)."""
    return {k: v for k, v in data.items() if k not in unset or v is not unset[k]}


class ReportRow(_Frozen):
    """One model on one split: the primary metric per task and their mean."""

    name: str
    kind: Kind
    mean: float | None  # None when a task has no value (the model failed, or lacks a metric)
    tasks: dict[str, float | None]
    metrics: Scores | None = None  # every metric it was scored on; None: it was not scored
    error: str | None = None  # why it failed

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _omit(handler(self), {"metrics": None, "error": None})

    def value(self, task: str | None) -> float | None:
        """The task's primary metric, or (task None) the mean."""
        return self.mean if task is None else self.tasks.get(task)


class PrimaryMetric(_Frozen):
    metric: str
    higher_is_better: bool


class OptimizerSummary(BaseModel):
    """The optimizer's name and the options the study gave it, flat as in study.yaml."""

    model_config = ConfigDict(frozen=True, extra="allow")
    name: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SpaceSummary(_Frozen):
    preset: str | None
    description: str
    methods: tuple[str, ...]
    granularity: int
    genes: int


class ModelsSummary(_Frozen):
    base: str | None
    sources: dict[str, str]  # name -> path, in the study's order


class RunSummary(_Frozen):
    """The run the report is about: its progress, search space, optimizer, models and tasks."""

    name: str
    run_dir: str
    state: str | None
    trials: int
    budget: int
    ok: int
    failed: int
    duplicates: int
    seconds_per_trial: float | None
    optimizer: OptimizerSummary
    seed: int
    search_space: SpaceSummary
    models: ModelsSummary
    objectives: tuple[str, ...]
    search_tasks: tuple[str, ...]
    heldout_tasks: tuple[str, ...]


class TopTrial(_Frozen):
    trial: int
    fitness: tuple[float, ...]
    scores: Scores


class TrialSummary(_Frozen):
    """The trial the report (and an export) is about."""

    trial: int
    fitness: tuple[float, ...]
    scores: Scores
    recipe_hash: str
    is_best: bool


class Report(_Frozen):
    """report.json. `scored` is False until the baselines table is computed (or read from the
    cache, then `cached` is True); `seconds` is how long scoring it took."""

    format: int = REPORT_FORMAT
    evomerge_version: str
    created: float
    run: RunSummary
    trial: TrialSummary
    top_trials: tuple[TopTrial, ...]
    fingerprint: str
    scored: bool = False
    heldout: tuple[ReportRow, ...] = ()
    search: tuple[ReportRow, ...] = ()
    primary_metrics: dict[Split, dict[str, PrimaryMetric]] = {}
    greedy_soup: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    seconds: float | None = None
    cached: bool = False

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _omit(handler(self), {"seconds": None, "cached": False})

    def rows(self, split: Split) -> tuple[ReportRow, ...]:
        return self.heldout if split == "heldout" else self.search

    def to_json(self) -> str:
        """report.json's text: indented, and NaN refused (it is no JSON)."""
        return json.dumps(self.model_dump(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Report:
        return cls.model_validate_json(text)

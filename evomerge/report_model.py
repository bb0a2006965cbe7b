"""report.json as types: what `build_report` writes and what the cache, the tables and the model
card read back, so no reader indexes a dict by string keys.

DESIGN.md's contract: `heldout` and `search` are lists of rows `{name, kind, mean, tasks}`, `kind`
one of `KINDS`, `mean` the mean of the tasks' primary metrics. The models serialize to exactly
the keys, key order and values report.json has always had: keys that are optional there (a row's
`metrics`, `error` and `vs_evolved`, the report's `comparison`, `search_fitness`, `seconds` and
`cached`) are left out when unset, never written as null, and options of the optimizer stay flat
beside its name; a report.json written before a key existed reads back and writes unchanged.
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


class VsEvolved(_Frozen):
    """This row's mean minus the evolved row's, over the same items, with a paired bootstrap
    confidence interval (evomerge.bootstrap); `significant`: the interval excludes 0."""

    diff: float
    ci: tuple[float, float]
    significant: bool


class ReportRow(_Frozen):
    """One model on one split: the primary metric per task and their mean."""

    name: str
    kind: Kind
    mean: float | None  # None when a task has no value (the model failed, or lacks a metric)
    tasks: dict[str, float | None]
    metrics: Scores | None = None  # every metric it was scored on; None: it was not scored
    error: str | None = None  # why it failed
    vs_evolved: VsEvolved | None = None  # None: the evolved row itself, or not comparable

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _omit(handler(self), {"metrics": None, "error": None, "vs_evolved": None})

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


class Comparison(_Frozen):
    """How the rows' `vs_evolved` intervals were computed, over how many items per split, and
    why a split or a row has none (a split missing from `items` has none)."""

    method: str = "paired bootstrap, items resampled within each task"
    confidence: float
    resamples: int
    seed: int
    items: dict[Split, int] = {}
    notes: tuple[str, ...] = ()

    def same_settings(self, other: Comparison) -> bool:
        keys = ("method", "confidence", "resamples", "seed")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


class SearchFitness(_Frozen):
    """The chosen trial's fitness as the study recorded it (the best of `trials` noisy, possibly
    subset, scores is biased upward) and re-measured on every search item by the report."""

    trial: int
    trials: int  # successful trials the best was chosen from
    fidelity: str  # the study's fitness.fidelity: with racing a score may come from a subset
    recorded: tuple[float, ...]
    remeasured: tuple[float, ...] | None  # None: the evolved model failed when re-scored


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
    comparison: Comparison | None = None  # None: written before item-level comparisons
    search_fitness: SearchFitness | None = None
    notes: tuple[str, ...] = ()
    seconds: float | None = None
    cached: bool = False

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        unset = {"comparison": None, "search_fitness": None, "seconds": None, "cached": False}
        return _omit(handler(self), unset)

    def rows(self, split: Split) -> tuple[ReportRow, ...]:
        return self.heldout if split == "heldout" else self.search

    def to_json(self) -> str:
        """report.json's text: indented, and NaN refused (it is no JSON)."""
        return json.dumps(self.model_dump(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Report:
        return cls.model_validate_json(text)

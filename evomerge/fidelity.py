"""Fidelity: on how many of the fitness items a candidate is scored, and what that estimates.

`fitness.fidelity: racing` scores a candidate on rung 0 (a fixed, stratified subset: the same
fraction of every task's items, the same items for every candidate, so comparisons are paired),
then on the items of each next rung only while it can still change a decision (evomerge/racing.py
decides). Rungs are nested prefixes of one seeded permutation per task, so a promotion scores only
new items and never scores an item twice for the same recipe; the last rung is every item, the
full-fidelity fitness. Pure functions over item results; no torch, no lm-eval.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from evomerge.items import ItemScores, mean_and_variance


class FitnessConfig(BaseModel):
    """How much of the fitness each candidate pays for (`fitness:` in study.yaml)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    fidelity: Literal["full", "racing"] = Field(
        "full", description="full: every item for every candidate; racing: rungs of items"
    )
    estimator: Literal["mean", "irt"] = Field(
        "mean", description="full-set estimate from a subset: its mean, or an item response model"
    )
    rungs: int = Field(3, ge=2, le=8, description="racing: rungs of items, the last is all items")
    eta: float = Field(
        3.0, gt=1, description="racing: each rung has eta x the items of the one below"
    )
    confidence: float = Field(
        0.9, gt=0.5, lt=1, description="racing: how sure a comparison must be to stop a candidate"
    )
    min_items: int = Field(8, ge=1, description="racing: items of every task on rung 0, at least")
    cohort_rule: Literal["confidence", "halving"] = Field(
        "confidence",
        description=(
            "racing with a generational optimizer (cma): confidence promotes every member whose "
            "side of the top-mu cut is not yet sure; halving promotes the top 1/eta of each rung"
        ),
    )

    @property
    def racing(self) -> bool:
        return self.fidelity == "racing"

    @property
    def z(self) -> float:
        """One-sided normal quantile of `confidence`."""
        return NormalDist().inv_cdf(self.confidence)


@dataclass(frozen=True)
class Rungs:
    """The item sets of every rung, per task (sorted document indices; nested)."""

    sets: tuple[Mapping[str, np.ndarray], ...]
    counts: Mapping[str, int]  # items per task (the full set)

    @classmethod
    def build(cls, counts: Mapping[str, int], config: FitnessConfig, seed: int) -> Rungs:
        sets = []
        orders = {t: _permutation(n, seed, t) for t, n in counts.items()}
        for r in range(config.rungs):
            fraction = config.eta ** -(config.rungs - 1 - r)
            rung = {}
            for task, n in counts.items():
                k = (
                    n
                    if r == config.rungs - 1
                    else min(n, max(config.min_items, math.ceil(fraction * n)))
                )
                rung[task] = np.sort(orders[task][:k])
            sets.append(rung)
        return cls(tuple(sets), dict(counts))

    @property
    def last(self) -> int:
        return len(self.sets) - 1

    def delta(self, rung: int, scored: int | None) -> dict[str, list[int]]:
        """Items of `rung` not in rung `scored` (None: nothing scored yet), per task."""
        have = self.sets[scored] if scored is not None else {}
        out = {}
        for task, ids in self.sets[rung].items():
            new = ids[~np.isin(ids, have.get(task, np.zeros(0, np.int64)))]
            if new.size:
                out[task] = new.tolist()
        return out

    def size(self, rung: int) -> int:
        return int(sum(len(v) for v in self.sets[rung].values()))

    def fraction(self, rung: int) -> float:
        return self.size(rung) / max(1, sum(self.counts.values()))


def _permutation(n: int, seed: int, task: str) -> np.ndarray:
    """The task's item order: seeded by the study seed and the task name, nothing else."""
    rng = np.random.default_rng(
        np.random.SeedSequence([seed & 0xFFFFFFFF, zlib.crc32(task.encode())])
    )
    return rng.permutation(n).astype(np.int64)


@dataclass(frozen=True)
class Term:
    """One objective term on items: sign * weight * mean(task's metric)."""

    task: str
    metric: str
    coefficient: float


def estimate_mean(
    items: ItemScores, terms: Sequence[Term], counts: Mapping[str, int]
) -> tuple[float, float]:
    """The subset-mean estimate of the fitness and its variance (0 at full fidelity)."""
    value, var = 0.0, 0.0
    for term in terms:
        m, v = mean_and_variance(items.values[term.task][term.metric], counts[term.task])
        value += term.coefficient * m
        var += term.coefficient**2 * v
    return value, var


def paired_difference(
    a: ItemScores, b: ItemScores, terms: Sequence[Term], counts: Mapping[str, int]
) -> tuple[float, float]:
    """fitness(a) - fitness(b) estimated on the items both were scored on (paired: the same
    items, so item difficulty cancels), with its variance (0 when both have every item)."""
    diff, var = 0.0, 0.0
    for term in terms:
        common = np.intersect1d(a.ids[term.task], b.ids[term.task], assume_unique=True)
        d = a.select(term.task, term.metric, common) - b.select(term.task, term.metric, common)
        m, v = mean_and_variance(d, counts[term.task], bounds=(-1.0, 1.0))
        diff += term.coefficient * m
        var += term.coefficient**2 * v
    return diff, var


def interval(value: float, variance: float, z: float) -> tuple[float, float]:
    half = z * math.sqrt(variance) if math.isfinite(variance) else math.inf
    return value - half, value + half

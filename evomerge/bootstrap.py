"""Paired, stratified bootstrap confidence intervals for differences of benchmark means.

The report's `mean` is the mean over tasks of each task's primary metric, and each task's metric
is the mean of its items. Two models scored on the same items differ by, per task, the mean of
the per-item differences; the bootstrap resamples items within each task (stratified: each task
keeps its size, so its weight in the mean is fixed) and keeps pairs (an item is drawn for both
models at once), which removes the between-item variance the two models share: with 96 items a
task at 0.5 has a standard error of 0.05 alone, far less for the difference of two models that
get mostly the same items right.

Vectorised over resamples and over the models compared: per task, blocks of resampled item
indices are turned into counts (resamples x items) and multiplied with the per-item differences
of every model at once. Pure numpy; seeded, so a report is reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0
_BLOCK_ELEMENTS = 1 << 16  # item counts computed at once: cache-sized, whatever the task size


@dataclass(frozen=True)
class PairedInterval:
    """A model's difference to the reference (model minus reference) and its percentile CI."""

    diff: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (an interval of [0, 0], identical results, does not)."""
        return self.low > 0.0 or self.high < 0.0


def resampled_means(rng: np.random.Generator, d: np.ndarray, resamples: int) -> np.ndarray:
    """(resamples, models): the mean of each model's row of `d` (models, n) over `resamples`
    draws of n items with replacement, the same draws for every model. Blocks of resamples are
    turned into item counts (block, n) and multiplied with `d`: 2^16 counts at a time keeps
    them in cache (measured 10x faster than 2^21 for 10,000 items) and memory flat."""
    n = d.shape[1]
    block = max(1, min(resamples, _BLOCK_ELEMENTS // n))
    out = np.empty((resamples, d.shape[0]))
    for start in range(0, resamples, block):
        rows = min(block, resamples - start)
        idx = rng.integers(0, n, size=(rows, n))  # (rows, n) item indices
        flat = idx + (np.arange(rows) * n)[:, None]
        counts = np.bincount(flat.ravel(), minlength=rows * n).reshape(rows, n)
        out[start : start + rows] = counts @ d.T / n
    return out


def paired_bootstrap(
    diffs: Mapping[str, np.ndarray],
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = SEED,
) -> list[PairedInterval]:
    """Per model, the difference of means over tasks and its bootstrap CI.

    `diffs[task]` is (models, items): each model's per-item value minus the reference's on the
    same item. Tasks are resampled in the order given, each from the same generator, so every
    model is judged on the same resamples (and two calls with the same inputs agree)."""
    if not diffs:
        return []
    arrays = [np.atleast_2d(np.asarray(d, dtype=np.float64)) for d in diffs.values()]
    models = arrays[0].shape[0]
    for task, d in zip(diffs, arrays, strict=True):
        if d.shape[0] != models or d.shape[1] == 0:
            raise ValueError(f"{task}: differences of shape {d.shape}, expected ({models}, n>0)")
    if resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(
            f"resamples {resamples} must be >= 1 and confidence {confidence} in (0, 1)"
        )
    rng = np.random.default_rng(seed)
    point = np.zeros(models)
    boot = np.zeros((resamples, models))  # resampled mean over tasks, per model
    for d in arrays:
        point += d.mean(axis=1)
        boot += resampled_means(rng, d, resamples)  # (resamples, models)
    point /= len(arrays)
    boot /= len(arrays)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(boot, [tail, 100.0 - tail], axis=0)
    return [
        PairedInterval(float(p), float(lo), float(hi))
        for p, lo, hi in zip(point, low, high, strict=True)
    ]

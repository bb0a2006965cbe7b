"""Fidelity: rungs of items, subset-mean estimates and paired differences."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge.fidelity import (
    FitnessConfig,
    Rungs,
    Term,
    estimate_mean,
    interval,
    paired_difference,
)
from evomerge.items import ItemScores

COUNTS = {"add": 300, "facts": 90}


def test_rungs_are_nested_stratified_and_seeded() -> None:
    cfg = FitnessConfig(fidelity="racing", rungs=3, eta=3, min_items=8)
    rungs = Rungs.build(COUNTS, cfg, seed=0)
    sizes = [{t: len(r[t]) for t in COUNTS} for r in rungs.sets]
    assert sizes == [{"add": 34, "facts": 10}, {"add": 100, "facts": 30}, COUNTS]
    for lo, hi in zip(rungs.sets, rungs.sets[1:], strict=False):
        for t in COUNTS:
            assert set(lo[t]) <= set(hi[t])  # a promotion only adds items
    assert rungs.sets[-1]["add"].tolist() == list(range(300))
    again = Rungs.build(COUNTS, cfg, seed=0)
    other = Rungs.build(COUNTS, cfg, seed=1)
    assert again.sets[0]["add"].tolist() == rungs.sets[0]["add"].tolist()
    assert other.sets[0]["add"].tolist() != rungs.sets[0]["add"].tolist()
    delta = rungs.delta(1, 0)
    assert sorted(delta["add"] + rungs.sets[0]["add"].tolist()) == rungs.sets[1]["add"].tolist()
    assert rungs.delta(2, None)["facts"] == list(range(90))
    assert rungs.fraction(2) == 1.0 and rungs.size(0) == 44
    small = Rungs.build({"t": 5}, cfg, seed=0)  # min_items caps at the task's size
    assert [len(r["t"]) for r in small.sets] == [5, 5, 5]


def _items(values: dict[str, list[float]], ids: dict[str, list[int]] | None = None) -> ItemScores:
    ids = ids or {t: list(range(len(v))) for t, v in values.items()}
    return ItemScores.from_lists(ids, {t: {"acc": v} for t, v in values.items()})


def test_mean_estimate_and_its_variance_against_closed_form() -> None:
    terms = [Term("a", "acc", 2.0), Term("b", "acc", -1.0)]
    x = _items({"a": [1, 0, 1, 1], "b": [0, 0, 1, 0]})
    value, var = estimate_mean(x, terms, {"a": 8, "b": 4})
    assert value == pytest.approx(2 * 0.75 - 0.25)
    va = np.var([1, 0, 1, 1, 0, 1], ddof=1) / 4 * (1 - 4 / 8)  # b is complete: no variance
    assert var == pytest.approx(4 * va)
    lo, hi = interval(value, var, 1.2816)
    assert lo < value < hi and hi - value == pytest.approx(1.2816 * math.sqrt(var))


def test_paired_difference_uses_common_items_only() -> None:
    terms = [Term("a", "acc", 1.0)]
    low = _items({"a": [1, 0, 1]}, {"a": [2, 5, 7]})
    high = _items({"a": [1, 1, 1, 0, 1, 1]}, {"a": [1, 2, 3, 5, 6, 7]})
    diff, var = paired_difference(high, low, terms, {"a": 10})
    # common items 2, 5, 7: high 1, 0, 1 vs low 1, 0, 1; 3 of 10 items leave doubt
    pseudo = np.array([0.0, 0.0, 0.0, -1.0, 1.0])
    assert diff == 0.0 and var == pytest.approx(pseudo.var(ddof=1) / 3 * (1 - 3 / 10))
    full_a = _items({"a": [1, 1, 0, 0]})
    full_b = _items({"a": [0, 1, 0, 0]})
    diff, var = paired_difference(full_a, full_b, terms, {"a": 4})
    assert diff == 0.25 and var == 0.0  # every item: an exact comparison

"""The paired, stratified bootstrap: known cases, a slow loop over the same draws, the analytic
standard error of a stratified mean, and the properties the report relies on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evomerge.bootstrap import PairedInterval, paired_bootstrap


def _percentile(sorted_values: list[float], q: float) -> float:
    """numpy's default ('linear') percentile, written out."""
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _slow(
    diffs: dict[str, np.ndarray], resamples: int, seed: int
) -> list[tuple[float, float, float]]:
    """One resample at a time in Python: for each task, draw its items with replacement from
    the same seeded generator (one call of `resamples x n` indices per task, the draws the
    vectorised code makes when a task's block holds every resample), mean of the drawn per-item
    differences, then the mean over tasks."""
    rng = np.random.default_rng(seed)
    draws = {t: rng.integers(0, d.shape[1], size=(resamples, d.shape[1])) for t, d in diffs.items()}
    out = []
    for m in range(next(iter(diffs.values())).shape[0]):
        point = sum(sum(d[m].tolist()) / d.shape[1] for d in diffs.values()) / len(diffs)
        means = []
        for b in range(resamples):
            per_task = []
            for t, d in diffs.items():
                row = d[m].tolist()
                per_task.append(sum(row[i] for i in draws[t][b].tolist()) / len(row))
            means.append(sum(per_task) / len(per_task))
        means.sort()
        out.append((point, _percentile(means, 2.5), _percentile(means, 97.5)))
    return out


def test_equals_a_slow_loop_over_the_same_draws():
    rng = np.random.default_rng(7)
    # two tasks of 30 and 20 items (2000 x 30 indices: one block), three models, 0/1 metrics
    ref = {"a": rng.integers(0, 2, 30), "b": rng.integers(0, 2, 20)}
    models = {t: rng.integers(0, 2, (3, r.size)) for t, r in ref.items()}
    diffs = {t: (models[t] - ref[t]).astype(float) for t in ref}
    fast = paired_bootstrap(diffs, resamples=2000, seed=3)
    for got, (point, low, high) in zip(fast, _slow(diffs, 2000, 3), strict=True):
        assert math.isclose(got.diff, point, abs_tol=1e-12)
        assert math.isclose(got.low, low, abs_tol=1e-12)
        assert math.isclose(got.high, high, abs_tol=1e-12)


def test_identical_rows_give_zero_and_an_interval_of_zero():
    (iv,) = paired_bootstrap({"a": np.zeros((1, 50)), "b": np.zeros((1, 7))})
    assert iv == PairedInterval(0.0, 0.0, 0.0) and not iv.significant


def test_better_or_worse_on_every_item_excludes_zero():
    rng = np.random.default_rng(0)
    better = {"a": rng.uniform(0.01, 1, (1, 40)), "b": np.ones((1, 10))}
    (up,) = paired_bootstrap(better)
    assert up.low > 0 and up.significant
    (down,) = paired_bootstrap({t: -d for t, d in better.items()})
    assert down.high < 0 and down.significant
    # one item better and the rest equal: never below 0, yet 0 is inside: not significant
    one = np.zeros((1, 96))
    one[0, 5] = 1.0
    (iv,) = paired_bootstrap({"a": one})
    assert iv.diff == pytest.approx(1 / 96) and iv.low == 0.0 and not iv.significant


def test_items_are_resampled_within_each_task():
    """Stratified: a task whose items all differ by 1 contributes exactly 1 / tasks to every
    resample, whatever its size beside the other task (pooled resampling would not)."""
    (iv,) = paired_bootstrap({"small": np.ones((1, 5)), "large": np.zeros((1, 200))})
    assert (iv.diff, iv.low, iv.high) == (0.5, 0.5, 0.5)


def test_spread_matches_the_standard_error_of_a_stratified_mean():
    """Tasks larger than one block of draws: the interval is the normal one, +-1.96 standard
    errors with SE^2 = sum_t var_t / n_t / T^2 (var with ddof 0: the bootstrap's own)."""
    rng = np.random.default_rng(11)
    diffs = {
        "a": rng.choice([-1.0, 0.0, 1.0], (2, 400), p=[0.2, 0.5, 0.3]),
        "b": rng.choice([-1.0, 0.0, 1.0], (2, 300), p=[0.1, 0.8, 0.1]),
    }
    for m, iv in enumerate(paired_bootstrap(diffs, resamples=4000, seed=1)):
        se = math.sqrt(sum(d[m].var() / d.shape[1] for d in diffs.values())) / len(diffs)
        mean = sum(d[m].mean() for d in diffs.values()) / len(diffs)
        assert iv.diff == pytest.approx(mean)
        assert iv.low == pytest.approx(mean - 1.96 * se, abs=0.15 * se)
        assert iv.high == pytest.approx(mean + 1.96 * se, abs=0.15 * se)


def test_every_model_gets_the_same_resamples_and_seeds_repeat():
    rng = np.random.default_rng(5)
    diffs = {"a": rng.integers(-1, 2, (3, 60)).astype(float), "b": rng.normal(size=(3, 25))}
    together = paired_bootstrap(diffs, seed=2)
    alone = [paired_bootstrap({t: d[[m]] for t, d in diffs.items()}, seed=2)[0] for m in range(3)]
    for t, a in zip(together, alone, strict=True):  # a row's interval ignores the other rows
        assert (t.diff, t.low, t.high) == pytest.approx((a.diff, a.low, a.high), abs=1e-12)
    assert paired_bootstrap(diffs, seed=2) == together
    assert paired_bootstrap(diffs, seed=3) != together
    wide = paired_bootstrap(diffs, seed=2, confidence=0.99)
    assert all(w.low <= t.low and w.high >= t.high for w, t in zip(wide, together, strict=True))


def test_bad_inputs_are_refused():
    assert paired_bootstrap({}) == []
    with pytest.raises(ValueError, match="b: differences of shape"):
        paired_bootstrap({"a": np.zeros((2, 4)), "b": np.zeros((1, 4))})
    with pytest.raises(ValueError, match="a: differences of shape"):
        paired_bootstrap({"a": np.zeros((1, 0))})
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap({"a": np.zeros((1, 4))}, confidence=1.0)

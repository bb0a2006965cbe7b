"""The irt estimator on data simulated from a known 2PL: item recovery, full-set estimates of new
candidates from a subset (better ranked and closer than the subset mean), honest intervals, the
exact full-fidelity case, degenerate inputs, determinism."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from evomerge import irt
from evomerge.items import mean_and_variance

TASKS, PER_TASK = 3, 200
FRACTIONS = (4, 8, 16)  # a quarter, an eighth, a sixteenth of each task's items


@dataclass(frozen=True)
class World:
    a: np.ndarray
    b: np.ndarray
    task: np.ndarray
    train: np.ndarray  # (200, 600)
    new: np.ndarray  # (100, 600) candidates not in the fit
    model: irt.ItemModel
    rng_seed: int = 0

    def truth(self) -> np.ndarray:  # (100, T) full-set means
        return np.stack([self.new[:, self.task == t].mean(axis=1) for t in range(TASKS)], 1)

    def subset(self, k: int) -> np.ndarray:
        """A random 1/k of each task's items (the same for every candidate), sorted."""
        rng = np.random.default_rng(k)
        per = [
            rng.choice(np.flatnonzero(self.task == t), PER_TASK // k, replace=False)
            for t in range(TASKS)
        ]
        return np.sort(np.concatenate(per))


def simulate(rng: np.random.Generator, n: int, a, b, task, corr: float = 0.6) -> np.ndarray:
    """0/1 responses of n models whose per-task abilities are N(0, 1), correlated `corr` across
    tasks (a merge that breaks fails every task)."""
    cov = np.full((TASKS, TASKS), corr) + (1 - corr) * np.eye(TASKS)
    theta = rng.multivariate_normal(np.zeros(TASKS), cov, n)
    p = 1 / (1 + np.exp(-(a * theta[:, task] - b)))
    return (rng.random(p.shape) < p).astype(np.float64)


@pytest.fixture(scope="module")
def world() -> World:
    rng = np.random.default_rng(0)
    a = rng.lognormal(0.0, 0.5, TASKS * PER_TASK)
    b = rng.normal(0.0, 1.0, TASKS * PER_TASK)
    task = np.repeat(np.arange(TASKS), PER_TASK)
    train = simulate(rng, 200, a, b, task)
    new = simulate(rng, 100, a, b, task)
    return World(a, b, task, train, new, irt.fit_items(train, task))


def estimates(world: World, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """irt means, subset means, irt variances: (100, T) each."""
    out = [irt.estimate(world.model, ids, row[ids]) for row in world.new]
    return (
        np.array([[e.mean for e in r] for r in out]),
        np.array([[e.observed_mean for e in r] for r in out]),
        np.array([[e.variance for e in r] for r in out]),
    )


def per_task_spearman(est: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([spearmanr(est[:, t], truth[:, t])[0] for t in range(TASKS)]))


def test_item_parameters_are_recovered(world) -> None:
    m = world.model
    assert spearmanr(m.b, world.b)[0] > 0.9
    assert spearmanr(m.a, world.a)[0] > 0.7
    assert np.all(m.a > 0)
    # the fit is the MAP, not a few steps from the data-driven start (which already ranks b
    # well): the log posterior's gradient in b and theta vanishes (numpy, not torch's autograd)
    p = 1 / (1 + np.exp(-(m.a * m.theta[:, m.task] - m.b)))
    resid = p - world.train  # d(-log lik)/dz
    grad_b = -resid.sum(axis=0) + m.b / irt._SIGMA_B**2
    grad_theta = (
        np.stack([(resid[:, m.task == t] * m.a[m.task == t]).sum(axis=1) for t in range(TASKS)], 1)
        + m.theta / irt._SIGMA_THETA**2
    )
    assert np.abs(grad_b).max() < 1e-3 and np.abs(grad_theta).max() < 1e-3


def test_items_of_a_task_need_not_be_contiguous(world) -> None:
    order = np.random.default_rng(5).permutation(world.task.size)
    shuffled = irt.fit_items(world.train[:, order], world.task[order])
    assert np.allclose(shuffled.b, world.model.b[order], atol=1e-4)
    assert np.allclose(shuffled.a, world.model.a[order], atol=1e-4)


def test_irt_ranks_and_estimates_new_candidates_better_than_the_subset_mean(world) -> None:
    truth = world.truth()
    rows = []
    for k in FRACTIONS:
        est, mean, _ = estimates(world, world.subset(k))
        sp_irt, sp_mean = per_task_spearman(est, truth), per_task_spearman(mean, truth)
        err_irt, err_mean = np.abs(est - truth).mean(), np.abs(mean - truth).mean()
        rows.append((k, sp_irt, sp_mean, err_irt, err_mean))
        assert sp_irt >= sp_mean, (k, sp_irt, sp_mean)
        assert err_irt < err_mean, (k, err_irt, err_mean)
    print("\n1/k  spearman irt / mean   mean abs error irt / mean")
    for k, si, sm, ei, em in rows:
        print(f"1/{k:<3d} {si:.3f} / {sm:.3f}          {ei:.4f} / {em:.4f}")
    _, sp_irt, sp_mean, _, _ = rows[0]
    assert sp_irt >= 0.9 and sp_irt > sp_mean  # the target at a quarter of the items


def test_intervals_cover_the_full_set_mean(world) -> None:
    """The variance is what racing trusts: 95% intervals must hold about 95% of the truths."""
    truth = world.truth()
    for k in (4, 16):
        est, _, var = estimates(world, world.subset(k))
        covered = np.mean(np.abs(est - truth) <= 1.96 * np.sqrt(var))
        assert 0.9 <= covered <= 0.99, (k, covered)


def test_every_item_observed_gives_the_observed_mean_and_no_variance(world) -> None:
    row = world.new[0]
    ids = np.arange(row.size)
    for t, e in enumerate(irt.estimate(world.model, ids, row)):
        values = row[world.task == t]
        assert e.mean == values.sum() / values.size  # exactly, bit for bit
        assert e.variance == 0.0
        assert e.weight == 1.0 and e.fallback is None


def test_a_task_with_no_item_observed_is_predicted_from_the_others(world) -> None:
    """Abilities correlate across tasks in the training rows, so tasks 0 and 1 inform task 2."""
    ids = world.subset(4)
    ids = ids[world.task[ids] != 2]
    out = [irt.estimate(world.model, ids, row[ids])[2] for row in world.new]
    pred = np.array([e.mean for e in out])
    assert all(e.n_observed == 0 and math.isfinite(e.variance) and e.variance > 0 for e in out)
    assert spearmanr(pred, world.truth()[:, 2])[0] > 0.4


def test_degenerate_items_and_two_training_rows_stay_finite() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((30, 40)) < 0.5).astype(np.float64)
    y[:, 0] = 1.0  # every row right
    y[:, 1] = 0.0  # every row wrong
    y[3, 5:] = np.nan  # a row not scored on some items
    model = irt.fit_items(y, np.repeat([0, 1], 20))
    for arr in (model.a, model.b, model.theta):
        assert np.all(np.isfinite(arr))
    # easy and hard, held near by the prior (without it L-BFGS stops on a flat slope at 20)
    assert -8 < model.b[0] < -1 and 1 < model.b[1] < 8
    ids = np.array([0, 1, 2, 25, 30])
    for e in irt.estimate(model, ids, np.array([1.0, 0.0, 1.0, 0.0, 1.0])):
        assert math.isfinite(e.mean) and math.isfinite(e.variance) and e.fallback is None

    two = irt.fit_items(y[:2])  # columns 0 and 1 degenerate here too
    assert all(np.all(np.isfinite(x)) for x in (two.a, two.b, two.theta))
    ids, values = np.array([0, 3, 4, 9]), np.array([1.0, 0.0, 1.0, 1.0])
    (e,) = irt.estimate(two, ids, values)
    assert "2 training rows" in e.fallback and e.weight == 1.0
    assert (e.mean, e.variance) == mean_and_variance(values, 40)  # the mean estimator's answer


def test_values_that_are_probabilities_fit_as_bernoulli_targets() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.lognormal(0, 0.5, 150), rng.normal(0, 1, 150)
    theta = rng.normal(0, 1, (60, 1))
    p = 1 / (1 + np.exp(-(a * theta - b)))
    model = irt.fit_items(p)  # expected values, not 0/1 draws
    assert spearmanr(model.b, b)[0] > 0.95
    ids = np.arange(0, 150, 4)
    (e,) = irt.estimate(model, ids, p[0, ids])
    assert abs(e.mean - p[0].mean()) < 0.03


def test_fits_and_estimates_are_deterministic_whatever_the_thread_count() -> None:
    # big enough that torch would split its reductions over threads, and the optimum's bits
    # would differ (measured: by 1e-5 in some a) were the fit not single-threaded
    rng = np.random.default_rng(3)
    task = np.tile([0, 1, 2], 300)  # items of a task interleaved: the fit groups them itself
    a, b = rng.lognormal(0, 0.5, 900), rng.normal(0, 1, 900)
    theta = rng.normal(0, 1, (300, 3))
    y = (rng.random((300, 900)) < 1 / (1 + np.exp(-(a * theta[:, task] - b)))).astype(np.float64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        first = irt.fit_items(y, task)
        torch.set_num_threads(2)
        second = irt.fit_items(y, task)
        assert torch.get_num_threads() == 2  # the caller's setting is restored
    finally:
        torch.set_num_threads(before)
    for x, z in [(first.a, second.a), (first.b, second.b), (first.theta, second.theta)]:
        assert x.tobytes() == z.tobytes()
    ids = np.arange(0, 900, 3)
    assert irt.estimate(first, ids, y[0, ids]) == irt.estimate(second, ids, y[0, ids])


def test_tasks_by_name_match_the_global_model(world) -> None:
    names = ("add", "copy", "reverse")
    tm = irt.fit_tasks({n: world.train[:, world.task == t] for t, n in enumerate(names)})
    assert tm.offsets == (0, 200, 400)
    assert np.array_equal(tm.model.a, world.model.a)
    ids = world.subset(4)
    local = {n: ids[world.task[ids] == t] - 200 * t for t, n in enumerate(names)}
    values = {n: world.new[0, ids[world.task[ids] == t]] for t, n in enumerate(names)}
    by_name = irt.estimate_tasks(tm, local, values)
    assert list(by_name.values()) == irt.estimate(world.model, ids, world.new[0, ids])
    with pytest.raises(ValueError, match=r"\['mul'\] are not in the item model"):
        irt.estimate_tasks(tm, {"mul": np.array([0])}, {"mul": np.array([1.0])})
    with pytest.raises(ValueError, match=r"add: document indices must lie in 0\.\.199"):
        irt.estimate_tasks(tm, {"add": np.array([200])}, {"add": np.array([1.0])})


def test_bad_inputs_say_what_is_wrong(world) -> None:
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        irt.fit_items(np.array([[0.0, 2.0]]))
    with pytest.raises(ValueError, match="some task has no items"):
        irt.fit_items(np.zeros((3, 2)), np.array([0, 2]))
    with pytest.raises(ValueError, match="must not repeat"):
        irt.estimate(world.model, np.array([1, 1]), np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="values of shape"):
        irt.estimate(world.model, np.array([1, 2]), np.array([1.0]))


def _rows(responses: np.ndarray) -> list:
    """Rows of one task ("add", metric acc) as a study's item files hold them."""
    from evomerge.items import ItemScores

    ids = np.arange(responses.shape[1])
    return [ItemScores({"add": ids}, {"add": {"acc": row}}) for row in responses]


def test_refit_takes_the_parents_first_and_fits_once_they_and_the_rows_reach_min_rows(world):
    from evomerge.estimators import IrtRefit, irt_estimator, mean_estimator
    from evomerge.fidelity import Term
    from evomerge.items import ItemScores

    terms, counts = (Term("add", "acc", 1.0),), {"add": PER_TASK}
    responses = world.train[:, world.task == 0]
    parents, rows = _rows(responses[:3]), _rows(responses[3:10])
    ids = np.sort(np.random.default_rng(4).choice(PER_TASK, PER_TASK // 4, replace=False))
    part = ItemScores({"add": ids}, {"add": {"acc": world.new[0, world.task == 0][ids]}})
    mean = mean_estimator(terms, counts)(part)

    alone = IrtRefit(terms, counts)
    for row in rows[:5]:
        alone.add(row)
    assert alone(part) == mean and alone.fitted_on == 0  # 5 candidate rows: the mean

    refit = IrtRefit(terms, counts)
    for row in rows[:5]:
        refit.add(row)
    refit.set_parents(parents)  # 3 parents + 5 rows = MIN_ROWS: fitted
    got = refit(part)
    assert refit.fitted_on == irt.MIN_ROWS and got != mean
    assert got == irt_estimator(parents + rows[:5], terms, counts)(part)
    refit.add(rows[5])  # 9 rows: still the fit on the first 8, parents first
    assert refit(part) == got and refit.fitted_on == 8
    refit.add(rows[6])  # 10: refitted on all of them
    assert refit(part) == irt_estimator(parents + rows[:7], terms, counts)(part)
    assert refit.fitted_on == 10

"""Item response estimates of a full-set score from a subset (`fitness.estimator: irt`).

A 2PL model per task, P(item j correct | model) = sigmoid(a_j * theta[task_j] - b_j), is fitted
on the item results of the models scored on every item so far (parents, full-fidelity
candidates): joint MAP with weak Gaussian priors on theta, a, log a and b (the priors keep items
that every training row got right, or wrong, finite). A new candidate scored on a subset gets
only its abilities fitted, items fixed (Newton; a few ms), and its full-set mean per task is

    p-IRT = (sum of observed values + sum over unseen items of P(correct)) / N     (tinyBenchmarks)
    gp-IRT = lambda * observed mean + (1 - lambda) * p-IRT

with lambda the convex weight that minimizes the squared error of the two on the training rows
scored on the same subset (tinyBenchmarks picks it on held-out models; ours are the training
rows, so it is optimistic when they are few: below `MIN_ROWS` rows the estimate is the plain
mean with `fallback` saying why). Every observed item makes both equal to the observed mean,
variance 0. Values that are not 0/1 are Bernoulli probabilities in the likelihood.

The candidate's abilities across tasks share a Gaussian prior with the training rows' mean and
(shrunk) covariance, so a task's items inform the others when the rows say abilities move
together (a broken merge fails every task).

Deterministic: float64, a fixed optimizer and starting point, one torch thread while fitting
(a reduction's bits depend on the thread count; torch's setting is process-wide, restored
after). Torch is imported only by `fit_items`; estimates are numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from evomerge.items import mean_and_variance

#: Training rows scored on every item that the irt estimate needs; with fewer the item
#: parameters overfit the rows that also choose lambda, and the estimate is the mean's.
MIN_ROWS = 8
_SIGMA_THETA = 1.0  # sets the ability scale (the model is otherwise unidentified)
_SIGMA_LOG_A = 1.0  # a within e^-2..e^2 unless the data insist
_SIGMA_A = 3.0  # and a ~ N(1, 3^2) too: the log-normal alone let a pure-noise item reach a = 767
#                 (a perfect fit of its 300 rows), this tail keeps it under 7; 2PL fits unchanged
_SIGMA_B = 3.0  # weak: items much easier or harder than the rows stay possible
_COV_SHRINK = 5.0  # pseudo-rows pulling the candidates' ability covariance toward identity
_MAX_ITER = 400


@dataclass(frozen=True, eq=False)
class ItemModel:
    """Fitted item parameters, per-item task index, and the training rows (for lambda)."""

    a: np.ndarray  # (I,) discrimination, > 0
    b: np.ndarray  # (I,) P(correct) = sigmoid(a * theta[task] - b)
    task: np.ndarray  # (I,) int64 task index of each item, 0..T-1
    theta: np.ndarray  # (R, T) MAP abilities of the training rows
    responses: np.ndarray  # (R, I) training values, NaN = not observed
    prior_mean: np.ndarray  # (T,) ability prior of a new candidate
    prior_cov: np.ndarray  # (T, T)
    #: lambda and variance scales per observed subset: racing scores every candidate of a rung
    #: on the same items, so each rung is calibrated once
    _calibrations: dict[bytes, tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict, repr=False
    )

    @property
    def n_tasks(self) -> int:
        return int(self.prior_mean.size)

    def n_items(self, task: int) -> int:
        return int(np.count_nonzero(self.task == task))

    def complete_rows(self) -> np.ndarray:
        """Indices of the training rows scored on every item: those that choose lambda."""
        return np.flatnonzero(~np.isnan(self.responses).any(axis=1))


@dataclass(frozen=True)
class Estimate:
    """A task's full-set mean estimated from a subset, and the variance of that estimate."""

    mean: float
    variance: float
    observed_mean: float
    n_observed: int
    n_items: int
    weight: float  # lambda: weight of the observed mean (1.0: the mean estimator)
    fallback: str | None = None  # why the irt part was not used, None when it was


def fit_items(responses: np.ndarray, task: np.ndarray | None = None) -> ItemModel:
    """Fit a 2PL model per task on `responses` (models x items, values in [0, 1], NaN = not
    observed); `task[j]` is item j's task index (None: one task). Deterministic."""
    import torch

    y = np.asarray(responses, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] == 0 or y.shape[1] == 0:
        raise ValueError(f"responses must be a non-empty (models, items) matrix, got {y.shape}")
    observed = ~np.isnan(y)
    if np.any((y[observed] < 0) | (y[observed] > 1)):
        raise ValueError("responses must lie in [0, 1] (NaN for items not observed)")
    tasks = np.zeros(y.shape[1], np.int64) if task is None else np.asarray(task, np.int64)
    if tasks.shape != (y.shape[1],) or tasks.min() < 0:
        raise ValueError(f"task must give each of the {y.shape[1]} items an index >= 0")
    n_tasks = int(tasks.max()) + 1
    if np.bincount(tasks, minlength=n_tasks).min() == 0:
        raise ValueError(f"task indices must cover 0..{n_tasks - 1}; some task has no items")

    order = np.argsort(tasks, kind="stable")  # items grouped by task: broadcasts, no gathers
    ys, obs_s, tasks_s = y[:, order], observed[:, order], tasks[order]
    bounds = np.searchsorted(tasks_s, np.arange(n_tasks + 1))
    a0, b0, theta0 = _start(ys, obs_s, tasks_s, n_tasks)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yt = torch.from_numpy(np.where(obs_s, ys, 0.0))
        mask = None if obs_s.all() else torch.from_numpy(obs_s.astype(np.float64))
        theta = torch.tensor(theta0, requires_grad=True)
        log_a = torch.tensor(np.log(a0), requires_grad=True)
        b = torch.tensor(b0, requires_grad=True)
        opt = torch.optim.LBFGS(
            [theta, log_a, b],
            max_iter=_MAX_ITER,
            history_size=20,
            tolerance_grad=1e-4,
            tolerance_change=1e-12,
            line_search_fn="strong_wolfe",
        )

        def loss() -> torch.Tensor:
            opt.zero_grad()
            a = log_a.exp()
            value = (
                theta.square().sum() / _SIGMA_THETA**2
                + log_a.square().sum() / _SIGMA_LOG_A**2
                + (a - 1.0).square().sum() / _SIGMA_A**2
                + b.square().sum() / _SIGMA_B**2
            ) / 2
            for t in range(n_tasks):
                lo, hi = int(bounds[t]), int(bounds[t + 1])
                z = theta[:, t : t + 1] * a[lo:hi] - b[lo:hi]  # (R, items of t)
                nll = torch.nn.functional.softplus(z) - yt[:, lo:hi] * z  # Bernoulli, y in [0, 1]
                value = value + (nll if mask is None else nll * mask[:, lo:hi]).sum()
            value.backward()
            return value

        opt.step(loss)
        inverse = np.argsort(order, kind="stable")
        a_hat = log_a.detach().exp().numpy()[inverse].copy()
        b_hat = b.detach().numpy()[inverse].copy()
        theta_hat = theta.detach().numpy().copy()
    finally:
        torch.set_num_threads(threads)
    mean, cov = _ability_prior(theta_hat)
    return ItemModel(
        a=_frozen(a_hat),
        b=_frozen(b_hat),
        task=_frozen(tasks.copy()),
        theta=_frozen(theta_hat),
        responses=_frozen(y.copy()),
        prior_mean=_frozen(mean),
        prior_cov=_frozen(cov),
    )


def estimate(model: ItemModel, observed_ids: np.ndarray, values: np.ndarray) -> list[Estimate]:
    """Per task, the full-set mean of a candidate scored on items `observed_ids` (indices into
    the model's items, any tasks) with `values` in that order."""
    ids = np.asarray(observed_ids, dtype=np.int64)
    vals = np.asarray(values, dtype=np.float64)
    if ids.ndim != 1 or vals.shape != ids.shape:
        raise ValueError(f"{ids.size} observed ids but values of shape {vals.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= model.a.size):
        raise ValueError(f"observed ids must index the model's {model.a.size} items")
    if np.unique(ids).size != ids.size:
        raise ValueError("observed ids must not repeat an item")
    if np.any(np.isnan(vals)) or np.any((vals < 0) | (vals > 1)):
        raise ValueError("observed values must lie in [0, 1]")

    rows = model.complete_rows()
    fallback = None
    if rows.size < MIN_ROWS:
        fallback = f"{rows.size} training rows scored on every item, irt needs {MIN_ROWS}"
    else:
        cand_p, cand_v = _pirt(model, ids, vals[None, :])
        key = ids.tobytes()
        if key not in model._calibrations:
            if len(model._calibrations) >= 64:
                model._calibrations.clear()
            model._calibrations[key] = _calibrate(model, ids, rows)
        lams, scales = model._calibrations[key]
    out = []
    for t in range(model.n_tasks):
        obs = vals[model.task[ids] == t]
        n_items = model.n_items(t)
        m, v_m = mean_and_variance(obs, n_items)
        if obs.size == n_items:  # every item: exactly the observed mean, no uncertainty
            out.append(Estimate(m, 0.0, m, obs.size, n_items, 1.0))
        elif fallback is not None:
            if obs.size == 0:
                raise ValueError(f"task {t}: no item observed and {fallback}")
            out.append(Estimate(m, v_m, m, obs.size, n_items, 1.0, fallback))
        else:
            lam, p, v_p = float(lams[t]), float(cand_p[0, t]), float(cand_v[0, t])
            mean = p if lam == 0.0 else lam * m + (1 - lam) * p
            var = float(scales[t]) * _combined_variance(lam, v_m, v_p)
            out.append(Estimate(mean, var, m, obs.size, n_items, lam))
    return out


# ---------------------------------------------------------------- tasks by name


@dataclass(frozen=True, eq=False)
class TaskItemModel:
    """An `ItemModel` over named tasks, each with its own item order (document indices)."""

    names: tuple[str, ...]
    offsets: tuple[int, ...]  # first global item of each task
    model: ItemModel


def fit_tasks(responses: Mapping[str, np.ndarray]) -> TaskItemModel:
    """Fit on per-task matrices (models x that task's items; the same models, same row order)."""
    names = tuple(responses)
    mats = [np.asarray(responses[n], dtype=np.float64) for n in names]
    if not mats or len({m.shape[0] for m in mats}) != 1:
        raise ValueError("every task's responses need the same models (rows), in the same order")
    sizes = [m.shape[1] for m in mats]
    offsets = tuple(int(x) for x in np.cumsum([0, *sizes[:-1]]))
    task = np.repeat(np.arange(len(names)), sizes)
    return TaskItemModel(names, offsets, fit_items(np.hstack(mats), task))


def estimate_tasks(
    tm: TaskItemModel, ids: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray]
) -> dict[str, Estimate]:
    """Per task name: the full-set estimate from the document indices `ids[task]` scored with
    `values[task]` (tasks not in `ids` are treated as observed on no item)."""
    unknown = set(ids) - set(tm.names)
    if unknown:
        raise ValueError(f"tasks {sorted(unknown)} are not in the item model ({list(tm.names)})")
    gid, gval = [], []
    for k, name in enumerate(tm.names):
        local = np.asarray(ids.get(name, ()), dtype=np.int64)
        n = tm.model.n_items(k)
        if local.size and (local.min() < 0 or local.max() >= n):
            raise ValueError(f"{name}: document indices must lie in 0..{n - 1}")
        gid.append(local + tm.offsets[k])
        gval.append(np.asarray(values.get(name, ()), dtype=np.float64))
    est = estimate(tm.model, np.concatenate(gid), np.concatenate(gval))
    return dict(zip(tm.names, est, strict=True))


# ---------------------------------------------------------------- internals


def _pirt(model: ItemModel, ids: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """p-IRT for k rows scored on `ids` with values `y` (k, n): full-set means (k, T) and their
    variances (k, T): the ability's Laplace variance through the unseen items' slope, plus the
    Bernoulli variance of the unseen items themselves."""
    theta, cov = _fit_theta(model, ids, y)  # (k, T), (k, T, T)
    n_t = np.bincount(model.task, minlength=model.n_tasks).astype(np.float64)
    unseen = np.ones(model.a.size, bool)
    unseen[ids] = False
    a_u, tk_u = model.a[unseen], model.task[unseen]
    p_u = _sigmoid(a_u * theta[:, tk_u] - model.b[unseen])  # (k, U)
    w_u = p_u * (1 - p_u)
    obs_sum = _per_task(y, model.task[ids], model.n_tasks)
    slope = _per_task(a_u * w_u, tk_u, model.n_tasks)  # d(sum of unseen P)/d theta
    var_theta = np.diagonal(cov, axis1=1, axis2=2)
    mean = (obs_sum + _per_task(p_u, tk_u, model.n_tasks)) / n_t
    var = (slope**2 * var_theta + _per_task(w_u, tk_u, model.n_tasks)) / n_t**2
    return mean, var


def _fit_theta(model: ItemModel, ids: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MAP abilities of k rows (items fixed) by damped Newton on a strictly concave posterior,
    and the Laplace covariance (inverse negative Hessian) at the optimum."""
    k, n_tasks = y.shape[0], model.n_tasks
    a, b, tk = model.a[ids], model.b[ids], model.task[ids]
    eye = np.eye(n_tasks)[None, :, :]
    prec = np.linalg.inv(model.prior_cov)
    mu = model.prior_mean
    theta = np.tile(mu, (k, 1))

    def log_post(th: np.ndarray) -> np.ndarray:
        z = a * th[:, tk] - b
        ll = (y * z - np.logaddexp(0.0, z)).sum(axis=1)
        d = th - mu
        return ll - 0.5 * np.einsum("ki,ij,kj->k", d, prec, d)

    current = log_post(theta)
    for _ in range(50):
        p = _sigmoid(a * theta[:, tk] - b)  # (k, n)
        grad = _per_task(a * (y - p), tk, n_tasks) - (theta - mu) @ prec  # (k, T)
        h = _per_task(a**2 * p * (1 - p), tk, n_tasks)  # likelihood curvature, per task
        hess = prec[None, :, :] + h[:, :, None] * eye
        step = np.linalg.solve(hess, grad[:, :, None])[:, :, 0]
        scale = np.ones(k)
        for _ in range(30):  # halve the step where it does not increase the posterior
            trial = log_post(theta + scale[:, None] * step)
            worse = trial < current - 1e-12
            if not worse.any():
                break
            scale = np.where(worse, scale / 2, scale)
        theta = theta + scale[:, None] * step
        current = log_post(theta)
        if np.max(np.abs(scale[:, None] * step)) < 1e-9:
            break
    p = _sigmoid(a * theta[:, tk] - b)
    h = _per_task(a**2 * p * (1 - p), tk, n_tasks)
    return theta, np.linalg.inv(prec[None, :, :] + h[:, :, None] * eye)


def _calibrate(
    model: ItemModel, ids: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per task, lambda and a variance scale from the training rows scored on every item,
    re-estimated from `ids` alone: lambda minimizes the squared error of lambda * mean +
    (1 - lambda) * p-IRT on those rows; the scale (>= 1) makes the model's variance match the
    squared error it had there, never claiming more certainty than the model does."""
    full = model.responses[rows]  # (R, I)
    y = full[:, ids]
    p, v_p = _pirt(model, ids, y)  # (R, T)
    lams = np.zeros(model.n_tasks)
    scales = np.ones(model.n_tasks)
    for t in range(model.n_tasks):
        in_t = model.task[ids] == t
        truth = full[:, model.task == t].mean(axis=1)
        n_items = model.n_items(t)
        if in_t.any():
            sub = y[:, in_t]
            m = sub.mean(axis=1)
            v_m = np.array([mean_and_variance(r, n_items)[1] for r in sub])
            em, ep = m - truth, p[:, t] - truth
            denom = float(np.sum((em - ep) ** 2))
            lam = 0.0 if denom == 0.0 else float(np.clip(np.sum(ep * (ep - em)) / denom, 0, 1))
        else:
            m, v_m, lam = np.zeros(rows.size), np.zeros(rows.size), 0.0
        err = lam * m + (1 - lam) * p[:, t] - truth
        model_var = np.array(
            [_combined_variance(lam, a, b) for a, b in zip(v_m, v_p[:, t], strict=True)]
        )
        mean_var = float(np.mean(model_var))
        lams[t] = lam
        scales[t] = max(1.0, float(np.mean(err**2)) / mean_var) if mean_var > 0 else 1.0
    return lams, scales


def _combined_variance(lam: float, v_m: float, v_p: float) -> float:
    """Variance of lam * mean + (1 - lam) * p-IRT taking the two as fully correlated (they read
    the same observed items): an upper bound, before the empirical scale."""
    if lam == 0.0:
        return v_p
    if not math.isfinite(v_m):
        return math.inf
    return (lam * math.sqrt(v_m) + (1 - lam) * math.sqrt(v_p)) ** 2


def _start(
    y: np.ndarray, observed: np.ndarray, tasks: np.ndarray, n_tasks: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Starting point from the data: b from each item's mean, theta from each row's standardized
    per-task logit mean, a = 1."""
    filled = np.where(observed, y, 0.0)
    counts = observed.sum(axis=0)
    item_mean = (filled.sum(axis=0) + 0.5) / (counts + 1.0)
    b0 = -_logit(item_mean)
    theta0 = np.zeros((y.shape[0], n_tasks))
    for t in range(n_tasks):
        cols = tasks == t
        n = observed[:, cols].sum(axis=1)
        row = _logit((filled[:, cols].sum(axis=1) + 0.5) / (n + 1.0))
        sd = row.std()
        theta0[:, t] = (row - row.mean()) / sd if sd > 0 else 0.0
    return np.ones(y.shape[1]), b0, theta0


def _ability_prior(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the training abilities, the covariance shrunk toward identity
    by `_COV_SHRINK` pseudo-rows (few rows cannot make the prior overconfident)."""
    r, n_tasks = theta.shape
    mean = theta.mean(axis=0)
    if r < 2:
        return mean, np.eye(n_tasks)
    d = theta - mean
    scatter = d.T @ d
    return mean, (scatter + _COV_SHRINK * np.eye(n_tasks)) / (r - 1 + _COV_SHRINK)


def _per_task(x: np.ndarray, task: np.ndarray, n_tasks: int) -> np.ndarray:
    """(k, n) values of items in tasks `task` -> (k, T) sums per task (numpy's pairwise sums,
    same bits every run)."""
    return np.stack([x[:, task == t].sum(axis=1) for t in range(n_tasks)], axis=1)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow warnings at large |z|


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def _frozen(x: np.ndarray) -> np.ndarray:
    x.setflags(write=False)
    return x

"""Fitness estimators from a subset of the items: `mean` (the subset mean) and `irt` (an item
response model fitted on the parents and on candidates scored on every item; evomerge/irt.py).

An estimator maps a candidate's item results to (fitness estimate, variance). The irt one is
refitted as full-fidelity rows accumulate (`IrtRefit`), at points that depend only on how many
there are, so a resumed study refits at the same points as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from evomerge.fidelity import Term, estimate_mean
from evomerge.items import ItemScores

Estimator = Callable[[ItemScores], tuple[float, float]]


def mean_estimator(terms: Sequence[Term], counts: dict[str, int]) -> Estimator:
    return lambda items: estimate_mean(items, terms, counts)


def irt_estimator(
    train: Sequence[ItemScores], terms: Sequence[Term], counts: dict[str, int]
) -> Estimator:
    """Fit on `train` (candidates scored on every item); estimate a candidate's fitness as the
    weighted sum of its tasks' irt estimates (each task's metric its own item model)."""
    from evomerge.irt import estimate_tasks, fit_tasks

    keys = [f"{t.task}\t{t.metric}" for t in terms]
    full = [row for row in train if all(row.ids[t.task].size == counts[t.task] for t in terms)]
    responses = {
        key: np.stack([row.values[t.task][t.metric] for row in full])
        for key, t in zip(keys, terms, strict=True)
    }
    if not full:
        return mean_estimator(terms, counts)
    model = fit_tasks(responses)

    def estimate(items: ItemScores) -> tuple[float, float]:
        ids = {key: items.ids[t.task] for key, t in zip(keys, terms, strict=True)}
        values = {key: items.values[t.task][t.metric] for key, t in zip(keys, terms, strict=True)}
        per = estimate_tasks(model, ids, values)
        value = sum(t.coefficient * per[k].mean for k, t in zip(keys, terms, strict=True))
        var = sum(t.coefficient**2 * per[k].variance for k, t in zip(keys, terms, strict=True))
        return float(value), float(var)

    return estimate


def refit_points(n: int) -> int:
    """The number of rows the irt model is fitted on when `n` full rows exist: the largest of
    8, 10, 13, 17, ... (a quarter more each time) not above n; 0 below 8 (the mean then)."""
    point, last = 8, 0
    while point <= n:
        last = point
        point = max(point + 1, round(point * 1.25))
    return last


@dataclass
class IrtRefit:
    """The irt estimator of a study, refitted on the first k rows as k passes `refit_points`:
    the parents first (evomerge/parents.py: known before any candidate), then the full-fidelity
    candidates in trial order. A fit costs about a second at 300 rows, and the same rows give
    the same model in a resumed study."""

    terms: Sequence[Term]
    counts: dict[str, int]
    rows: list[ItemScores] = field(default_factory=list)
    parents: list[ItemScores] = field(default_factory=list)
    fitted_on: int = -1
    _estimate: Estimator | None = None

    def add(self, full_row: ItemScores) -> None:
        self.rows.append(full_row)

    def set_parents(self, rows: Sequence[ItemScores]) -> None:
        """The parents' rows, in model order; set before the first estimate of a study."""
        self.parents = list(rows)
        self._estimate, self.fitted_on = None, -1

    @property
    def training(self) -> list[ItemScores]:
        """Every row the model may be fitted on, in the order `refit_points` takes them."""
        return [*self.parents, *self.rows]

    def __call__(self, items: ItemScores) -> tuple[float, float]:
        train = self.training
        k = refit_points(len(train))
        if self._estimate is None or k != self.fitted_on:
            rows = train[:k]
            self._estimate = (
                irt_estimator(rows, self.terms, self.counts)
                if rows
                else mean_estimator(self.terms, self.counts)
            )
            self.fitted_on = k
        return self._estimate(items)

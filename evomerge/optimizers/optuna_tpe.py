"""Optuna's TPE over a bounded history, so that an ask costs the same at trial 200 and 20,000.

TPE splits the finished trials into the best `gamma(n)` (25 once n >= 250: the "below" group,
whose density TPE maximizes) and the rest ("above"), fits a Parzen estimator to each, and scores
24 candidates under both: every ask walks every trial in Python and evaluates a mixture with one
component per trial, so its cost grows with the history (measured with `evomerge bench --parts
controller`, 15 genes: about 180 ms per ask at 2,000 trials on a loaded 2-core machine, against
about 10 ms at 100). Optuna 5's defaults are the ones for asynchronous workers and are kept:
multivariate TPE, and constant_liar (the running trials count as bad results, so 8 workers
asking in a row do not get 8 copies of one proposal).

Why 300. With the window, the ask costs in proportion to it (the Parzen mixtures have one
component per trial in it) plus a pass over the whole history to choose it. Measured on the
controller bench (2 shared cores, load 5, 8 workers), ms per ask at trials 1900-2000: 28 with
a window of 500 (49 ms per trial in all, at the 50 ms budget), 22.5 with 300 (46 ms). A study
of up to 300 finished trials sees its whole history either way.

`history: H` (default `HISTORY`) bounds what TPE sees once more than H trials are finished: the
best gamma(n) of all of them, which is exactly the below group TPE would pick from the whole
history, and the most recent H - gamma(n) of the others, the part of the above group that TPE's
default weights count most (they ramp linearly from 1/n for the oldest trial to 1 for the
newest 25). Running trials (constant_liar) are all kept. With H at least 250 the below group
and gamma are those of the whole history; only the above group's old tail is dropped. A
multi-objective study (whose below group is a Pareto ranking) is not bounded. `history: null`
gives Optuna's TPE unchanged. The window is a pure function of the recorded trials, so resume
stays exact.
"""

from __future__ import annotations

import heapq
from typing import Any

from optuna.samplers import TPESampler
from optuna.samplers._tpe.sampler import default_gamma
from optuna.study import StudyDirection
from optuna.trial import TrialState

HISTORY = 300


class WindowedTPESampler(TPESampler):
    """TPESampler that samples from a bounded window of the history (module docstring)."""

    def __init__(self, *, history: int | None = HISTORY, **kwargs: Any) -> None:
        if history is not None and history < 250:
            raise ValueError(
                f"history must be null or >= 250 (TPE's gamma saturates there), got {history}"
            )
        super().__init__(**kwargs)
        self._history = history

    def sample_relative(
        self, study: Any, trial: Any, search_space: dict[str, Any]
    ) -> dict[str, Any]:
        return super().sample_relative(self._window(study), trial, search_space)

    def sample_independent(
        self, study: Any, trial: Any, param_name: str, param_distribution: Any
    ) -> Any:
        return super().sample_independent(
            self._window(study), trial, param_name, param_distribution
        )

    def _window(self, study: Any) -> Any:
        if self._history is None or study._is_multi_objective():
            return study
        return _Window(study, self._history)


class _Window:
    """The study as TPE reads it during one ask: `_get_trials` returns the bounded window, the
    rest passes. TPE reads the trials twice an ask (finished ones, then with the running ones
    for constant_liar); the window's trials are chosen once, from the first read's."""

    def __init__(self, study: Any, history: int) -> None:
        self._study = study
        self._history = history
        self._keep: set[int] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, *args: Any, **kwargs: Any) -> list[Any]:
        trials = self._study._get_trials(*args, **kwargs)
        if self._keep is None:
            self._keep = kept(trials, self._history, self._study.direction)
        if not self._keep:
            return trials
        return [t for t in trials if t.state != TrialState.COMPLETE or t.number in self._keep]


def kept(trials: list[Any], history: int, direction: Any) -> set[int]:
    """The numbers of the complete trials in the window: the best gamma(n) of the n complete
    ones and the most recent `history` - gamma(n) others; empty when n <= history (no bound)."""
    complete = [(t.values[0], t.number) for t in trials if t.state == TrialState.COMPLETE]
    if len(complete) <= history:
        return set()
    k = default_gamma(len(complete))
    sign = 1.0 if direction == StudyDirection.MAXIMIZE else -1.0
    best = {n for _, n in heapq.nlargest(k, complete, key=lambda vn: (sign * vn[0], -vn[1]))}
    others = [n for _, n in complete if n not in best]
    return best | set(others[len(others) - (history - k) :])


def bounded(trials: list[Any], history: int, direction: Any) -> list[Any]:
    """The best gamma(n) of the n complete trials, the most recent `history` - gamma(n) others,
    and every trial not finished; in the order given (trial number)."""
    keep = kept(trials, history, direction)
    if not keep:
        return trials
    return [t for t in trials if t.state != TrialState.COMPLETE or t.number in keep]

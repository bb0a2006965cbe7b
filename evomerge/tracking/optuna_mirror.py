"""An Optuna storage for a study whose optimizer keeps none (cma): `RUN_DIR/optuna.journal`.

One trial per line of trials.jsonl, added as the line is appended: COMPLETE with the fitness as
value(s) (a failed candidate: FAIL), the genome as params with the search space's distributions
(a method choice is categorical), the bookkeeping as user attributes (records.user_attrs). So
`optuna-dashboard RUN_DIR/optuna.journal` shows history, importances and parallel coordinates of
any study. Racing records a line per rung, and so a trial per rung (`rung`, `fidelity`).

Why Optuna's JournalStorage and not SQLite: it is a file of JSON lines, appended with flush and
fsync under a lock made of a symlink, so it works on network file systems (NFS, Lustre) where
SQLite's fcntl locks are unreliable; optuna-dashboard and `optuna.load_study` read it while the
study writes it, with no database server.

Idempotent: the trials already in the file are known by their `trial` attribute, and only the
lines missing from it are added, in trials.jsonl order (`start` catches up after a crash between
an append and its mirror, or a mirror deleted by hand; numbers then match trials.jsonl's).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evomerge.optimizers.base import Dimension
from evomerge.runstore import TrialRecord
from evomerge.tracking.records import TRIAL_ATTR, user_attrs

STUDY_NAME = "evomerge"


def distributions(dims: Sequence[Dimension]) -> dict[str, Any]:
    """Each gene's Optuna distribution: a float range, or the categorical of a method choice."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    return {
        d.name: CategoricalDistribution(d.choices)
        if d.choices
        else FloatDistribution(d.low, d.high)
        for d in dims
    }


def frozen_trial(rec: TrialRecord, dists: dict[str, Any]) -> Any:
    """The Optuna trial of one line of trials.jsonl."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    params: dict[str, Any] = {}
    for name, dist in dists.items():
        value = rec.genome[name]
        if isinstance(dist, CategoricalDistribution):
            params[name] = str(value)
        else:  # recorded genomes are in bounds; rounding in JSON must not push one outside
            params[name] = min(dist.high, max(dist.low, float(value)))
    ok = rec.ok
    return create_trial(
        state=TrialState.COMPLETE if ok else TrialState.FAIL,
        values=list(rec.fitness) if ok else None,
        params=params,
        distributions=dists,
        user_attrs=user_attrs(rec),
    )


class OptunaMirror:
    """The TrialSink that writes RUN_DIR/optuna.journal (module docstring)."""

    name = "the Optuna mirror"

    def __init__(
        self, path: Path, dims: Sequence[Dimension], n_objectives: int, *, optimizer: str = ""
    ) -> None:
        self.path = Path(path)
        self.fix = f"that {self.path} is writable (delete it to have it rebuilt from trials.jsonl)"
        self.dims = list(dims)
        self.n_objectives = n_objectives
        self.optimizer = optimizer
        self._study: Any = None
        self._mirrored: set[int] = set()

    def start(self, records: Sequence[TrialRecord]) -> None:
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._dists = distributions(self.dims)
        storage = JournalStorage(JournalFileBackend(str(self.path)))
        self._study = optuna.create_study(
            storage=storage,
            study_name=STUDY_NAME,
            directions=["maximize"] * self.n_objectives,
            load_if_exists=True,
        )
        if not self._study.user_attrs:
            self._study.set_user_attr("evomerge", f"mirror of trials.jsonl ({self.optimizer})")
        self._mirrored = {
            t.user_attrs[TRIAL_ATTR]
            for t in self._study.get_trials(deepcopy=False)
            if TRIAL_ATTR in t.user_attrs
        }
        missing = [r for r in records if r.trial not in self._mirrored]
        if missing:
            self._study.add_trials([frozen_trial(r, self._dists) for r in missing])
            self._mirrored.update(r.trial for r in missing)

    def trial(self, record: TrialRecord, best: TrialRecord | None) -> None:
        if record.trial in self._mirrored:
            return
        self._study.add_trial(frozen_trial(record, self._dists))
        self._mirrored.add(record.trial)

    def close(self) -> None:
        self._study = None


def rebuild_mirror(
    path: Path,
    dims: Sequence[Dimension],
    n_objectives: int,
    records: Sequence[TrialRecord],
    *,
    optimizer: str = "",
) -> int:
    """Write the mirror afresh from `records` (resume --rebuild-state); returns its trials."""
    for stale in (path, path.with_name(path.name + ".lock")):
        stale.unlink(missing_ok=True)
    mirror = OptunaMirror(path, dims, n_objectives, optimizer=optimizer)
    mirror.start(records)
    mirror.close()
    return len(records)

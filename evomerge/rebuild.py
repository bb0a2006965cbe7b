"""The optimizer of a run: opened for the loop, and rebuilt from trials.jsonl when its state is lost.

A missing, empty or unreadable state (pickle garbage in optimizer.pkl, an optuna.db that is not a
database) stops a resume with one line saying what is wrong and how to rebuild it:
`evomerge resume RUN --rebuild-state`. The rebuild sets the old files aside in
RUN_DIR/state-before-rebuild/, starts the study's optimizer afresh (same seed, space, options and
warm start) and replays the recorded evaluations into it (`Optimizer.replay`):

- cma: each recorded proposal is asked again and must match its genome (checked; a mismatch is
  refused and the old files put back), then told its fitness: the state is exactly the one the
  run had, and the resumed run continues exactly (ids, genomes, values).
- Optuna: the told history is added to a fresh study (same params, values or FAIL, same trial
  numbers); what the database held beside the trials is rebuilt by the sampler as it goes
  (optimizers/optuna_samplers.py says what may differ). Proposals in flight at the crash are
  asked again.
"""

from __future__ import annotations

import glob
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from evomerge.optimizers import Optimizer
from evomerge.optimizers.base import OptimizerStateError, ReplayMismatchError, Told
from evomerge.runstore import TRIALS, RunStore, TrialRecord
from evomerge.study_plan import StudyPlan

ASIDE = "state-before-rebuild"


def open_optimizer(
    plan: StudyPlan,
    store: RunStore,
    records: Sequence[TrialRecord],
    *,
    resume: bool,
    rebuild: bool = False,
) -> Optimizer:
    """The run's optimizer: new for a new run, loaded when resuming, rebuilt when asked to.

    A resume whose state is missing (with trials recorded), empty or unreadable raises
    OptimizerStateError with the rebuild command; with no trial recorded a missing state is
    started afresh, which is exactly what a replay of nothing gives."""
    cls = plan.optimizer_class
    if rebuild:
        return rebuild_optimizer(plan, store, records)
    hint = (
        f"rebuild it from the {len(records)} trials in {TRIALS} with: "
        f"evomerge resume {store.dir} --rebuild-state"
    )
    if resume and records and not cls.has_state(store.dir):
        raise OptimizerStateError(f"{store.dir / cls.state_files[0]} is missing; {hint}")
    try:
        return plan.optimizer(store.dir, resume=resume)
    except OptimizerStateError as exc:
        raise OptimizerStateError(f"{exc}; {hint}") from None


def rebuild_optimizer(
    plan: StudyPlan, store: RunStore, records: Sequence[TrialRecord]
) -> Optimizer:
    """A fresh optimizer brought to the state of the recorded trials (module docstring)."""
    cls = plan.optimizer_class
    aside = _set_aside(store.dir, cls.state_files)
    optimizer = None
    try:
        optimizer = plan.optimizer(store.dir, resume=False)
        optimizer.replay(history(records))
        optimizer.save()
    except BaseException as exc:
        if optimizer is not None:
            optimizer.close()
        _put_back(store.dir, cls.state_files, aside)
        if isinstance(exc, ReplayMismatchError):
            raise ReplayMismatchError(
                f"{store.dir}: {TRIALS} does not replay into the {cls.name} optimizer: {exc}; "
                "the state cannot be rebuilt from it (was the run started with another "
                "evomerge or study.yaml?): start a new run, e.g. with warm_start: "
                f"{store.dir / 'best' / 'recipe.yaml'}"
            ) from None
        raise
    from evomerge.tracking import rebuild_storage

    rebuild_storage(plan, store, optimizer, records)  # the Optuna mirror, from the same lines
    kept = f"; the previous state files are in {aside}" if aside else ""
    print(
        f"rebuilt the {cls.name} optimizer state from {len(records)} trials in {TRIALS}{kept}",
        file=sys.stderr,
    )
    return optimizer


def history(records: Sequence[TrialRecord]) -> list[Told]:
    """The evaluations to replay, in the order they were told: one per proposal, from its last
    line (a racing candidate has a line per rung), in the order of those lines."""
    last = {r.proposal: r for r in records}
    order = sorted(last.values(), key=lambda r: r.trial)
    return [
        Told(r.proposal, dict(r.genome), tuple(r.fitness) if r.fitness is not None else None)
        for r in order
    ]


def _state_paths(run_dir: Path, names: Sequence[str]) -> list[Path]:
    """The state files and their companions (optuna.db-journal, -wal, -shm)."""
    return [Path(p) for n in names for p in sorted(glob.glob(glob.escape(str(run_dir / n)) + "*"))]


def _set_aside(run_dir: Path, names: Sequence[str]) -> Path | None:
    paths = _state_paths(run_dir, names)
    if not paths:
        return None
    aside = run_dir / ASIDE
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    for p in paths:
        p.rename(aside / p.name)
    return aside


def _put_back(run_dir: Path, names: Sequence[str], aside: Path | None) -> None:
    """Undo a failed rebuild: drop what it wrote, restore the files set aside."""
    for p in _state_paths(run_dir, names):
        p.unlink()
    if aside is not None:
        for p in aside.iterdir():
            p.rename(run_dir / p.name)
        aside.rmdir()

"""Where a study's trials go besides trials.jsonl: an Optuna storage, and experiment trackers.

Every run feeds a list of sinks, one trial at a time, as each line of trials.jsonl is appended:

- always, an Optuna storage that optuna-dashboard opens (`optuna_mirror.py`): the sampler's own
  `optuna.db` for Optuna samplers, annotated with each trial's user attributes
  (`optuna_own.py`); for every other optimizer (cma) a mirror, `RUN_DIR/optuna.journal`;
- the trackers named in `tracking:` (`wandb_sink.py`, `mlflow_sink.py`).

Sinks never stop or slow the study. They run on one background thread fed by a queue, so the
loop only enqueues (microseconds); a sink that raises is logged once, naming it and what to
check, and is off for the rest of the run; at the end the loop waits for the queue at most
`CLOSE_TIMEOUT` seconds. Nothing a sink writes is needed to resume: trials.jsonl is the record,
and the Optuna storage catches up from it when a run starts (keyed by trial number, so a crash
between the append and the sink duplicates nothing).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from evomerge.runstore import TrialRecord

if TYPE_CHECKING:
    from evomerge.config import StudyConfig
    from evomerge.optimizers import Optimizer
    from evomerge.report_model import Report
    from evomerge.runstore import RunStore
    from evomerge.study_plan import StudyPlan

LOG = logging.getLogger("evomerge.tracking")
CLOSE_TIMEOUT = 30.0  # s the loop waits, at its end, for sinks to finish what is queued
MIRROR = "optuna.journal"  # the Optuna storage of a study whose optimizer keeps none


class TrialSink(Protocol):
    """One destination of trials. Called on the tracking thread only, in this order: `start`
    once with the trials already recorded (catch up, or note where to continue), `trial` for
    each new line of trials.jsonl with the best so far, `close` once. Any exception turns the
    sink off (logged once with `fix`)."""

    name: str  # for the warning: "W&B", "MLflow", "the Optuna mirror"
    fix: str  # what to check when it fails

    def start(self, records: Sequence[TrialRecord]) -> None: ...

    def trial(self, record: TrialRecord, best: TrialRecord | None) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class OptunaBacked(Protocol):
    """An optimizer whose state is an Optuna study (optuna_samplers.OptunaOptimizer): its
    storage is the run's Optuna storage, and tracking adds user attributes to its trials."""

    @property
    def storage_url(self) -> str: ...

    def trial_number(self, proposal_id: int) -> int: ...


def optuna_storage(run_dir: Path, optimizer: Any) -> str:
    """What to pass to optuna-dashboard for this run."""
    if isinstance(optimizer, OptunaBacked):
        return optimizer.storage_url
    return str(run_dir / MIRROR)


class Tracking:
    """The sinks of one run behind a queue and one daemon thread (module docstring)."""

    def __init__(self, sinks: Sequence[TrialSink], *, close_timeout: float = CLOSE_TIMEOUT):
        self.sinks = list(sinks)
        self.failed: dict[str, str] = {}  # sink name -> the error that turned it off
        self.close_timeout = close_timeout
        self._queue: queue.SimpleQueue[tuple[str, tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._best: TrialRecord | None = None

    def start(self, records: Sequence[TrialRecord]) -> None:
        if not self.sinks or self._thread is not None:
            return
        for rec in records:
            self._track_best(rec)
        self._thread = threading.Thread(target=self._work, name="evomerge-tracking", daemon=True)
        self._thread.start()
        self._queue.put(("start", (list(records),)))

    def trial(self, record: TrialRecord) -> None:
        """A line just appended to trials.jsonl (the caller no longer changes it)."""
        if self._thread is None:
            return
        self._track_best(record)
        self._queue.put(("trial", (record, self._best)))

    def close(self) -> None:
        """Finish the sinks, waiting at most `close_timeout` s; idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(("close", ()))
        self._queue.put(None)
        thread.join(self.close_timeout)
        if thread.is_alive():
            LOG.warning(
                "evomerge: warning: tracking did not finish within %.0f s; left behind: %s "
                "(the run is complete on disk; the Optuna storage catches up on the next resume)",
                self.close_timeout,
                ", ".join(s.name for s in self.sinks if s.name not in self.failed) or "nothing",
            )

    def _track_best(self, rec: TrialRecord) -> None:
        """The best so far as best_trial counts it (ok, on every fitness item)."""
        better = self._best is None or (rec.ok and rec.fitness[0] > self._best.fitness[0])
        if rec.status == "ok" and rec.ok and rec.fidelity >= 1.0 and better:
            self._best = rec

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            method, args = item
            for sink in self.sinks:
                if sink.name not in self.failed:
                    self._call(sink, method, args)

    def _call(self, sink: TrialSink, method: str, args: tuple[Any, ...]) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception as exc:
            why = (str(exc).strip().splitlines() or [""])[0][:300]
            self.failed[sink.name] = f"{type(exc).__name__}: {why}"
            from evomerge.disk_full import disk_full_cause

            if disk_full_cause(exc) is not None:
                # The run directory's disk is full: the study's own next write meets it and says
                # so in its one error line (exit 75); resume rebuilds the mirror from trials.jsonl.
                LOG.debug("%s is off: the disk is full (%s)", sink.name, self.failed[sink.name])
            else:
                LOG.warning(
                    "evomerge: warning: %s failed (%s) and is off for the rest of this run; "
                    "the study goes on. Check %s",
                    sink.name,
                    self.failed[sink.name],
                    sink.fix,
                )
            if method != "close":  # let it release what it holds (a run, a connection)
                with contextlib.suppress(Exception):
                    sink.close()


def open_tracking(plan: StudyPlan, store: RunStore, optimizer: Optimizer) -> Tracking:
    """The sinks of a run: its Optuna storage, then the trackers its config names."""
    from evomerge.tracking.optuna_mirror import OptunaMirror
    from evomerge.tracking.optuna_own import OptunaAttrs

    sinks: list[TrialSink] = []
    if isinstance(optimizer, OptunaBacked):
        sinks.append(OptunaAttrs(optimizer.storage_url, optimizer.trial_number))
    else:
        sinks.append(
            OptunaMirror(
                store.dir / MIRROR,
                plan.space.dimensions(),
                plan.objective.n_objectives,
                optimizer=plan.config.optimizer.name,
            )
        )
    sinks.extend(_trackers(plan.config, store.dir))
    return Tracking(sinks)


def rebuild_storage(
    plan: StudyPlan, store: RunStore, optimizer: Optimizer, records: Sequence[TrialRecord]
) -> None:
    """`resume --rebuild-state`: write the Optuna mirror afresh from trials.jsonl (a sampler's
    own storage was just rebuilt by the optimizer; the user attributes follow at start)."""
    if isinstance(optimizer, OptunaBacked):
        return
    from evomerge.tracking.optuna_mirror import rebuild_mirror

    path = store.dir / MIRROR
    try:
        rebuild_mirror(
            path,
            plan.space.dimensions(),
            plan.objective.n_objectives,
            records,
            optimizer=plan.config.optimizer.name,
        )
    except Exception as exc:  # the optimizer is rebuilt; the mirror is a view of trials.jsonl
        LOG.warning(
            "evomerge: warning: could not rebuild %s (%s: %s)", path, type(exc).__name__, exc
        )


def _trackers(config: StudyConfig, run_dir: Path) -> list[Any]:
    tracking = config.tracking
    out: list[Any] = []
    if tracking.wandb is not None:
        from evomerge.tracking.wandb_sink import WandbSink

        out.append(WandbSink(tracking.wandb, config, run_dir))
    if tracking.mlflow is not None:
        from evomerge.tracking.mlflow_sink import MlflowSink

        out.append(MlflowSink(tracking.mlflow, config, run_dir))
    return out


def log_export(config: StudyConfig, run_dir: Path, out_dir: Path, report: Report) -> None:
    """Give the trackers an export: its recipe.yaml, mergekit.yaml, report.json and plots as
    artifacts of the study's run, and the held-out table. A tracker that fails is logged once
    and skipped; the export itself is already complete on disk."""
    files = sorted(
        p
        for p in out_dir.rglob("*")
        if p.is_file() and (p.parent.name == "plots" or p.name in _EXPORTED)
    )
    for tracker in _trackers(config, run_dir):
        try:
            tracker.export(files, out_dir, report)
        except Exception as exc:
            why = (str(exc).strip().splitlines() or [""])[0][:300]
            LOG.warning(
                "evomerge: warning: %s did not receive the export (%s: %s); the export in %s "
                "is complete. Check %s",
                tracker.name,
                type(exc).__name__,
                why,
                out_dir,
                tracker.fix,
            )


_EXPORTED = ("recipe.yaml", "mergekit.yaml", "report.json")

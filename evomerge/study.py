"""The study loop: ask, dispatch, record, tell, persist. It knows nothing of cma, Optuna or Ray.

Order of durability for every finished candidate: append its line to trials.jsonl (fsync), then
tell the optimizer and save its state, then rewrite best/ if it improved. A crash between any two
steps is repaired on resume: a proposal the optimizer still holds as pending but which has a line
in trials.jsonl is told from that line instead of being evaluated again.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from evomerge.config import StudyConfig, parse_study
from evomerge.errors import ConfigError
from evomerge.executors import Job
from evomerge.optimizers import Optimizer, Proposal
from evomerge.recipe import Recipe
from evomerge.runstore import RunStore, TrialRecord, best_trial
from evomerge.study_plan import StudyPlan
from evomerge.worker import Outcome


class InterruptGate:
    """Ctrl-C raises only while waiting on workers; during bookkeeping (append, tell, save) it
    is held until the step is complete, so state on disk is never half-updated. (pycma's
    pickling, for one, turns an interrupt inside it into an unrelated AttributeError.)"""

    def __init__(self) -> None:
        self.pending = False
        self.waiting = False
        self._previous: Any = None

    def __enter__(self) -> InterruptGate:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.waiting:
            raise KeyboardInterrupt
        self.pending = True

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    @contextmanager
    def waiting_on_workers(self) -> Iterator[None]:
        self.check()
        self.waiting = True
        try:
            yield
        finally:
            self.waiting = False


class Study:
    """Drives one run directory to its budget."""

    def __init__(self, store: RunStore, plan: StudyPlan, *, progress: bool = True) -> None:
        self.store = store
        self.plan = plan
        self.config = plan.config
        self.progress = progress
        self.records = store.read_trials()
        self.by_hash: dict[str, TrialRecord] = {
            r.recipe_hash: r for r in self.records if r.status != "duplicate"
        }
        self.recorded = {r.proposal: r for r in self.records}
        self.best = best_trial(self.records)

    def run(self, *, resume: bool = False) -> TrialRecord | None:
        from evomerge.progress import StudyProgress

        cfg = self.config
        self.store.repair()
        if self.best is not None and not self.store.best_is(self.best):
            # a crash between appending the new best and writing best/, or best/ deleted
            self.store.write_best(self.best, self.plan.space.decode(self.best.genome).to_yaml())
        optimizer = self.plan.optimizer(self.store.dir, resume=resume)
        optimizer.save()
        budget = cfg.budget.max_trials
        deadline = time.monotonic() + cfg.budget.max_seconds if cfg.budget.max_seconds else None
        self.store.set_state("running")
        redo: deque[Proposal] = deque()
        for prop in optimizer.pending():
            if prop.id in self.recorded:  # evaluated and appended, crash before tell
                optimizer.tell(prop.id, self.recorded[prop.id].fitness)
                optimizer.save()
            else:
                redo.append(prop)
        bar = StudyProgress(budget, enabled=self.progress, done=len(self.records), best=self.best)
        executor = self.plan.executor()
        in_flight: dict[int, tuple[Proposal, Recipe, str]] = {}
        stopped_by = "budget"
        try:
            with InterruptGate() as gate:
                while True:
                    gate.check()
                    out_of_time = deadline is not None and time.monotonic() >= deadline
                    while (
                        not out_of_time
                        and len(self.records) + len(in_flight) < budget
                        and len(in_flight) < executor.workers
                    ):
                        prop = redo.popleft() if redo else optimizer.ask()
                        if prop is None:
                            break
                        optimizer.save()
                        recipe = self.plan.space.decode(prop.params)
                        h = recipe.content_hash()
                        if h in self.by_hash:
                            self._record_duplicate(optimizer, prop, h)
                            bar.update(self.records[-1], self.best)
                            continue
                        in_flight[prop.id] = (prop, recipe, h)
                        executor.submit(Job(prop.id, recipe))
                    if not in_flight:
                        if out_of_time:
                            stopped_by = "time"
                        break
                    with gate.waiting_on_workers():
                        results = executor.wait()
                    for result in results:
                        prop, recipe, h = in_flight.pop(result.job.key)
                        self._record(optimizer, prop, recipe, h, result.outcome)
                        bar.update(self.records[-1], self.best)
        except BaseException:  # Ctrl-C or a crash: what finished is already on disk
            self.store.set_state("interrupted", trials=len(self.records))
            raise
        finally:
            bar.close()
            executor.close()
        self.store.set_state("finished", trials=len(self.records), stopped_by=stopped_by)
        return self.best

    def _record(
        self, optimizer: Optimizer, prop: Proposal, recipe: Recipe, h: str, outcome: Outcome
    ) -> None:
        from evomerge.errors import CandidateError

        fitness = None
        error = outcome.error
        if outcome.scores is not None:
            try:
                fitness = list(self.plan.objective.evaluate(outcome.scores))
            except CandidateError as exc:
                error = str(exc)
        rec = TrialRecord(
            trial=len(self.records),
            proposal=prop.id,
            status="ok" if fitness is not None else "failed",
            genome=dict(prop.params),
            recipe_hash=h,
            fitness=fitness,
            scores=outcome.scores or {},
            error=error,
            seconds={k: round(v, 4) for k, v in outcome.seconds.items()},
            worker=outcome.worker,
        )
        self._commit(optimizer, prop, rec)
        self.by_hash[h] = rec
        if rec.ok and (self.best is None or rec.fitness[0] > self.best.fitness[0]):
            self.best = rec
            self.store.write_best(rec, recipe.to_yaml())

    def _record_duplicate(self, optimizer: Optimizer, prop: Proposal, h: str) -> None:
        first = self.by_hash[h]
        rec = TrialRecord(
            trial=len(self.records),
            proposal=prop.id,
            status="duplicate",
            genome=dict(prop.params),
            recipe_hash=h,
            fitness=first.fitness,
            scores=first.scores,
            error=first.error,
            duplicate_of=first.trial,
        )
        self._commit(optimizer, prop, rec)

    def _commit(self, optimizer: Optimizer, prop: Proposal, rec: TrialRecord) -> None:
        self.store.append(rec)
        self.records.append(rec)
        self.recorded[prop.id] = rec
        optimizer.tell(prop.id, rec.fitness)
        optimizer.save()


def load_run_config(store: RunStore) -> StudyConfig:
    from evomerge.yaml_io import read_yaml

    data = read_yaml(store.dir / "study.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{store.dir / 'study.yaml'}: not a study config")
    return parse_study(data, str(store.dir / "study.yaml"))

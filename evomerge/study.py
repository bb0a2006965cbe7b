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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from evomerge.config import StudyConfig, parse_study
from evomerge.errors import ConfigError, DiskFullError, Terminated
from evomerge.executors import Job
from evomerge.optimizers import Optimizer, Proposal
from evomerge.parents import parent_recipes, score_parents, wants_parents
from evomerge.runstore import RunStore, TrialRecord, best_trial
from evomerge.scheduler import Evaluation, Scheduler
from evomerge.study_plan import StudyPlan
from evomerge.tracking import Tracking
from evomerge.worker import Outcome


class InterruptGate:
    """Ctrl-C (SIGINT) and SIGTERM raise only while waiting on workers; during bookkeeping
    (append, tell, save) they are held until the step is complete, so state on disk is never
    half-updated. (pycma's pickling, for one, turns an interrupt inside it into an unrelated
    AttributeError.) SIGTERM is how Slurm, Kubernetes and spot instances preempt a job before
    their SIGKILL: it raises `Terminated` (a KeyboardInterrupt, exit 143), and once it has,
    later SIGTERMs are ignored so the shutdown that follows (state.json, workers, Ray) runs to
    its end."""

    SIGNALS: ClassVar[dict[int, type[KeyboardInterrupt]]] = {
        signal.SIGINT: KeyboardInterrupt,
        signal.SIGTERM: Terminated,
    }

    def __init__(self) -> None:
        self.pending: type[KeyboardInterrupt] | None = None  # the signal held, SIGTERM first
        self.waiting = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> InterruptGate:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _reclaim(self) -> None:
        """Install the handlers again, as a library may have replaced them while workers
        started or ran: `ray.init` sets a Python SIGTERM handler that exits at once (code 15)
        and Ray's core worker a C one that aborts (134), both skipping the bookkeeping (the
        executor shuts Ray down itself). Unconditional: a C-level replacement is invisible to
        `signal.getsignal`."""
        for sig in self._previous:
            signal.signal(sig, self._handle)

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            if sig == signal.SIGTERM and self.pending is Terminated:
                previous = _ignore_signal
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)  # None: set in C
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        kind = self.SIGNALS[signum]
        first = self.pending is None
        if self.pending is not Terminated:
            self.pending = kind
        if self.waiting and first:
            raise kind

    def check(self) -> None:
        if self.pending is not None:
            raise self.pending

    @contextmanager
    def waiting_on_workers(self) -> Iterator[None]:
        self.check()
        self.waiting = True
        try:
            yield
        except KeyboardInterrupt as exc:
            if self.pending is Terminated and not isinstance(exc, Terminated):
                # Ray's ray.wait/ray.get turn a signal handler's exception into a plain
                # KeyboardInterrupt: it was SIGTERM all the same (exit 143, not 130)
                raise Terminated from None
            raise
        finally:
            self.waiting = False
            self._reclaim()


def _ignore_signal(signum: int, frame: Any) -> None:
    """A SIGTERM after the first: the shutdown it started is already under way."""


def mark_interrupted(store: RunStore, exc: BaseException, trials: int) -> DiskFullError | None:
    """state.json says interrupted after `exc` stopped the run. For a full disk, returns the
    one-line error to raise instead: what to free, how to resume, and whether state.json could
    be written. Otherwise None: the caller re-raises `exc`, and a state.json that a full disk
    kept from being written is not raised over a Ctrl-C or SIGTERM (status reads the dead pid
    it still holds as interrupted)."""
    from evomerge.disk_full import disk_full_cause, no_space

    try:
        store.set_state("interrupted", trials=trials)
        saved = True
    except DiskFullError:
        saved = False
    cause = disk_full_cause(exc)
    if cause is None:
        return None
    file = getattr(cause, "filename", None)  # SQLite's "database or disk is full" names none
    hint = f"free space there, then continue with: evomerge resume {store.dir} ({trials} finished trials are on disk"
    if not saved:
        hint += (
            "; state.json could not be updated either: it names this process, "
            "which `evomerge status` reports as interrupted once it has exited"
        )
    writing = "" if file else f"the study's state in {store.dir}"
    return no_space(file or store.dir, cause, writing=writing, hint=hint + ")")


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
        self.best = best_trial(self.records)
        self.sched = Scheduler(plan, store)
        self.parent_items = 0  # items the parents' rows cost (evomerge/parents.py)
        self.tracking = Tracking(())  # the run's sinks (evomerge/tracking), opened by run()

    @property
    def next_trial(self) -> int:
        """The number of the next trial: one past the highest (a line removed by hand from
        trials.jsonl leaves a gap that is not filled again, so numbers never repeat)."""
        return max((r.trial for r in self.records), default=-1) + 1

    def run(
        self, *, resume: bool = False, optimizer: Optimizer | None = None
    ) -> TrialRecord | None:
        """Run to the budget. `optimizer`: one the caller opened already (resume opens it before
        writing anything, so that a bad state refuses with nothing changed on disk).

        From the first step on, any exit but the budget's marks state.json interrupted: a Ctrl-C
        or SIGTERM while workers start (a Ray cluster can take minutes) included, which raises at
        once, since nothing is being written then."""
        from evomerge.progress import StudyProgress
        from evomerge.rebuild import open_optimizer
        from evomerge.tracking import open_tracking

        cfg = self.config
        bar = StudyProgress(
            cfg.budget.max_trials, enabled=self.progress, done=self.candidates, best=self.best
        )
        executor = None
        in_flight: dict[int, Evaluation] = {}
        stopped_by = "budget"
        try:
            with InterruptGate() as gate:  # a signal during this bookkeeping waits for its end
                self.store.set_state("running")
                self.store.repair()
                if self.best is not None and not self.store.best_is(self.best):
                    # a crash between appending the new best and writing best/, or best/ deleted
                    recipe_yaml = self.plan.space.decode(self.best.genome).to_yaml()
                    self.store.write_best(self.best, recipe_yaml)
                if optimizer is None:
                    optimizer = open_optimizer(self.plan, self.store, self.records, resume=resume)
                optimizer.save()
                self._restore(optimizer)
                self.tracking = open_tracking(self.plan, self.store, optimizer)
                self.tracking.start(self.records)  # a background thread: never in the way
                max_s = cfg.budget.max_seconds
                deadline = time.monotonic() + max_s if max_s else None
                with gate.waiting_on_workers():  # starting workers: a signal stops it at once
                    executor = self.plan.executor()
                self._parents(executor, gate)
                jobs = 0
                while True:
                    gate.check()
                    out_of_time = deadline is not None and time.monotonic() >= deadline
                    while not out_of_time and len(in_flight) < executor.workers:
                        if not self.sched.ready:
                            if not self._ask_new(optimizer, bar):
                                break
                            continue
                        ev = self.sched.pop_ready()
                        act = self.sched.active[ev.proposal]
                        in_flight[jobs] = ev
                        executor.submit(Job(jobs, act.recipe, rung=ev.rung, scored=ev.scored))
                        jobs += 1
                    if not in_flight:
                        if not out_of_time and self._close_cohort(optimizer):
                            continue
                        if out_of_time:
                            stopped_by = "time"
                        break
                    with gate.waiting_on_workers():
                        results = executor.wait()
                    for result in results:
                        self._record(in_flight.pop(result.job.key), result.outcome)
                        self._tell_final(optimizer)
                        bar.update(self.candidates, self.best)
        except BaseException as exc:  # a signal, a full disk, a crash: what finished is on disk
            full = mark_interrupted(self.store, exc, len(self.records))
            if full is None:
                raise
            raise full from exc
        finally:
            bar.close()
            if executor is not None:
                executor.close()
            self.tracking.close()
        self.store.set_state("finished", trials=len(self.records), stopped_by=stopped_by)
        return self.best

    # ------------------------------------------------------------------ budget
    @property
    def candidates(self) -> int:
        """Candidates started: distinct proposals recorded or under way (racing: a candidate
        has a line per rung, and counts once)."""
        return len({r.proposal for r in self.records} | set(self.sched.active))

    def _may_start(self) -> bool:
        budget = self.config.budget
        if self.candidates >= budget.max_trials:
            return False
        if budget.max_items is None:
            return True
        cost = self.sched.next_cost() or 0
        spent = sum(r.items for r in self.records) + self.parent_items
        return spent + cost <= budget.max_items

    def _parents(self, executor: Any, gate: InterruptGate) -> None:
        """Racing with the irt estimator: the parents' rows (evomerge/parents.py), read from
        their files and the missing ones scored, before the first candidate. A run that has
        trials but no parent files began before parents were rows: it continues without them,
        as it began."""
        if not wants_parents(self.config):
            return
        recipes = parent_recipes(self.plan)
        have = self.store.read_parent_items()
        if not self.records:
            missing = {name: r for name, r in recipes.items() if name not in have}
            for name, items, counts in score_parents(executor, missing, gate.waiting_on_workers):
                self.sched.counts_known(counts)  # counts.json before the first file
                self.store.write_parent_items(name, items)
                have[name] = items
        rows = [have[name] for name in recipes if name in have]
        self.parent_items = sum(row.count for row in rows)
        self.sched.set_parents(rows)

    def _ask_new(self, optimizer: Optimizer, bar: Any) -> bool:
        """Start one new candidate (or record a duplicate); False when none can start now."""
        if not self._may_start():
            self.sched.cohort_closed = True  # the budget ends this generation where it is
            return False
        prop = optimizer.ask()
        if prop is None:  # a generational optimizer waits for its generation to be told
            self.sched.cohort_closed = True
            return False
        optimizer.save()
        recipe = self.plan.space.decode(prop.params)
        h = recipe.content_hash()
        if h in self.by_hash:
            self._record_duplicate(optimizer, prop, h)
            bar.update(self.candidates, self.best)
            return True
        self.sched.add(prop, recipe, h)
        return True

    def _close_cohort(self, optimizer: Optimizer) -> bool:
        """Nothing runs: let the scheduler decide the open generation; True if work followed."""
        told = self._tell_final(optimizer)
        return bool(self.sched.ready) or told > 0

    # ------------------------------------------------------------------ records
    def _restore(self, optimizer: Optimizer) -> None:
        """Proposals pending at the last stop: told from their lines when final (a crash
        between append and tell), continued otherwise (racing: from their last rung)."""
        self.sched.load_history(self.records)
        for prop in optimizer.pending():
            lines = [r for r in self.records if r.proposal == prop.id]
            recipe = self.plan.space.decode(prop.params)
            self.sched.restore(prop, recipe, recipe.content_hash(), lines)
        self._tell_final(optimizer)

    def _incumbent(self) -> float | None:
        """The best score on every item among candidates already told."""
        full = [
            r.fitness[0]
            for r in self.records
            if r.ok and r.fidelity >= 1.0 and r.proposal not in self.sched.active
        ]
        return max(full) if full else None

    def _tell_final(self, optimizer: Optimizer) -> int:
        """Tell the optimizer every candidate whose score is final; returns how many."""
        done = self.sched.decide(self._incumbent())
        by_trial = {r.trial: r for r in self.records}
        for act in done:
            rec = by_trial[act.final_trial]
            optimizer.tell(act.prop.id, rec.fitness)
            optimizer.save()
            if rec.status != "duplicate":
                self.by_hash[act.recipe_hash] = rec
        return len(done)

    def _record(self, ev: Evaluation, outcome: Outcome) -> None:
        """Append the line of one evaluation (and its items), and rewrite best/ if it improved."""
        from evomerge.errors import CandidateError

        act = self.sched.active[ev.proposal]
        error = outcome.error
        try:
            est = self.sched.estimate(ev, outcome.items, outcome.scores, outcome.item_counts)
        except CandidateError as exc:
            est, error = None, str(exc)
        ok = est is not None and est.fitness is not None
        trial = self.next_trial
        if ok and est.items is not None:
            self.store.write_items(trial, est.items if ev.rung is None else outcome.items)
        rec = TrialRecord(
            trial=trial,
            proposal=act.prop.id,
            status="ok" if ok else "failed",
            genome=dict(act.prop.params),
            recipe_hash=act.recipe_hash,
            fitness=est.fitness if ok else None,
            scores=est.scores if ok else (outcome.scores or {}),
            error=error,
            seconds={k: round(v, 4) for k, v in outcome.seconds.items()},
            worker=outcome.worker,
            started_at=outcome.started_at,
            memory=outcome.memory,
            rung=ev.rung,
            items=outcome.items.count if outcome.items is not None else 0,
            fidelity=est.fidelity if ok else 1.0,
            ci=est.ci if ok else None,
        )
        self.store.append(rec)
        self.records.append(rec)
        self.tracking.trial(rec)
        self.sched.recorded(ev, rec, est.items if ok else None)
        if (
            rec.ok
            and rec.fidelity >= 1.0
            and (self.best is None or rec.fitness[0] > self.best.fitness[0])
        ):
            self.best = rec
            self.store.write_best(rec, act.recipe.to_yaml())

    def _record_duplicate(self, optimizer: Optimizer, prop: Proposal, h: str) -> None:
        first = self.by_hash[h]
        rec = TrialRecord(
            trial=self.next_trial,
            proposal=prop.id,
            status="duplicate",
            genome=dict(prop.params),
            recipe_hash=h,
            fitness=first.fitness,
            scores=first.scores,
            error=first.error,
            duplicate_of=first.trial,
            fidelity=first.fidelity,
        )
        self.store.append(rec)
        self.records.append(rec)
        self.tracking.trial(rec)
        optimizer.tell(prop.id, rec.fitness)
        optimizer.save()


def load_run_config(store: RunStore) -> StudyConfig:
    from evomerge.yaml_io import read_yaml

    data = read_yaml(store.dir / "study.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{store.dir / 'study.yaml'}: not a study config")
    return parse_study(data, str(store.dir / "study.yaml"))

"""Between the study loop and the workers: which evaluations each candidate needs, and when its
score is final and goes to the optimizer.

`fitness.fidelity: full` (the default): one evaluation per candidate, on every item, final at
once. `racing`: rung by rung (evomerge/fidelity.py for the rungs, evomerge/racing.py for the
decisions); each evaluation is a line of trials.jsonl with the candidate's estimate so far, and
the optimizer is told the estimate of the line on which the candidate's racing ends. Everything
here is rebuilt from trials.jsonl and items/ on resume, and the decisions are pure functions of
those records, so a resumed study continues exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from evomerge.errors import TaskError
from evomerge.estimators import IrtRefit
from evomerge.fidelity import Rungs, Term, estimate_mean, interval
from evomerge.items import ItemScores
from evomerge.optimizers import Proposal
from evomerge.racing import Candidate, Context, Plan, RungResult, halve_async, race_cohort
from evomerge.recipe import Recipe
from evomerge.runstore import RunStore, TrialRecord
from evomerge.study_plan import StudyPlan


@dataclass
class Active:
    """A candidate asked and not yet told."""

    prop: Proposal
    recipe: Recipe
    recipe_hash: str
    race: Candidate
    in_flight: bool = False
    last: TrialRecord | None = None  # its latest line
    final_trial: int | None = None  # once final: the line whose estimate it is told


@dataclass(frozen=True)
class Evaluation:
    """One evaluation to run: the items of `rung` that rung `scored` lacked (rung None: all)."""

    proposal: int
    rung: int | None
    scored: int | None


@dataclass(frozen=True)
class Estimate:
    """What a line records for a candidate after an evaluation."""

    fitness: list[float] | None
    scores: dict[str, dict[str, float]]
    items: ItemScores | None  # cumulative (racing) or this evaluation's (full)
    fidelity: float
    ci: list[float] | None
    error: str | None


@dataclass
class Scheduler:
    plan: StudyPlan
    store: RunStore
    active: dict[int, Active] = field(default_factory=dict)
    ready: deque[Evaluation] = field(default_factory=deque)
    history: list[RungResult] = field(default_factory=list)
    rungs: Rungs | None = None
    cohort_closed: bool = False
    irt: IrtRefit | None = None  # fitness.estimator irt: refitted as full rows accumulate

    def __post_init__(self) -> None:
        cfg = self.plan.config.fitness
        self.racing = cfg.racing
        self.generational = self.plan.optimizer_class.generational
        self.terms = tuple(
            Term(t.task, t.metric, t.sign * t.weight) for t in self.plan.objective.terms
        )

    # ------------------------------------------------------------------ candidates
    def add(self, prop: Proposal, recipe: Recipe, recipe_hash: str) -> None:
        """A new candidate: its first evaluation is queued."""
        self.active[prop.id] = Active(prop, recipe, recipe_hash, Candidate(prop.id))
        self.cohort_closed = False
        self.ready.append(Evaluation(prop.id, 0 if self.racing else None, None))

    def restore(
        self, prop: Proposal, recipe: Recipe, recipe_hash: str, lines: list[TrialRecord]
    ) -> None:
        """A candidate pending at the last stop, with the lines it already has (racing)."""
        act = Active(prop, recipe, recipe_hash, Candidate(prop.id))
        self.active[prop.id] = act
        items: ItemScores | None = None
        for rec in sorted(lines, key=lambda r: r.trial):
            act.last = rec  # full fidelity, or a failed line: final (decide tells it)
            if not (self.racing and rec.ok and rec.rung is not None):
                continue
            got = self.store.read_items(rec.trial)
            if got is None:  # a line whose items were lost: its rung is scored again
                continue
            items = got if items is None else items.union(got)
            act.race.results[rec.rung] = RungResult(rec.trial, rec.rung, items, rec.fitness[0])
        if not lines:
            self.ready.append(Evaluation(prop.id, 0 if self.racing else None, None))

    def load_history(self, records: list[TrialRecord]) -> None:
        """The item counts and every racing line recorded so far (ASHA compares with them)."""
        counts = self.store.read_item_counts()
        if counts:
            self._set_rungs(counts)
        if not self.racing:
            return
        cum: dict[int, ItemScores] = {}
        for rec in sorted(records, key=lambda r: r.trial):
            if rec.rung is None or not rec.ok:
                continue
            got = self.store.read_items(rec.trial)
            if got is None:
                continue
            cum[rec.proposal] = got if rec.proposal not in cum else cum[rec.proposal].union(got)
            result = RungResult(rec.trial, rec.rung, cum[rec.proposal], rec.fitness[0])
            self._remember(result, rec)

    def counts_known(self, counts: dict[str, int] | None) -> None:
        """The item counts of the first result: written once (resume rebuilds rungs from them)."""
        if self.rungs is None and counts:
            self.store.write_item_counts(counts)
            self._set_rungs(counts)

    def set_parents(self, rows: list[ItemScores]) -> None:
        """The parents' rows of the irt model (evomerge/parents.py), before any estimate: they
        come first in its training rows, so a resumed study fits on the same rows in order."""
        for row in rows:
            check_per_item(row, self.terms)
        if self.irt is not None:
            self.irt.set_parents(rows)

    def _set_rungs(self, counts: dict[str, int]) -> None:
        cfg = self.plan.config.fitness
        self.rungs = Rungs.build(counts, cfg, self.plan.config.seed)
        if cfg.estimator == "irt":
            self.irt = IrtRefit(self.terms, dict(counts))

    def _remember(self, result: RungResult, rec: TrialRecord) -> None:
        """A racing line: ASHA's history, and (every item) a row for the irt model."""
        self.history.append(result)
        if self.irt is not None and rec.fidelity >= 1.0:
            self.irt.add(result.items)

    def next_cost(self) -> int | None:
        """Items a new candidate's first evaluation scores (None before the first result)."""
        if self.rungs is None:
            return None
        return self.rungs.size(0) if self.racing else self.rungs.size(self.rungs.last)

    # ------------------------------------------------------------------ results
    def estimate(
        self, ev: Evaluation, outcome_items: ItemScores | None, scores, counts
    ) -> Estimate:
        """The line for an evaluation's outcome: full fidelity passes the scores through;
        racing estimates the fitness from every item the candidate has so far."""
        objective = self.plan.objective
        self.counts_known(counts)
        if not self.racing or scores is None:
            fitness = None if scores is None else list(objective.evaluate(scores))
            return Estimate(fitness, scores or {}, outcome_items, 1.0, None, None)
        act = self.active[ev.proposal]
        have = act.race.results
        prev = have[max(have)].items if have else None
        assert outcome_items is not None and self.rungs is not None
        items = outcome_items if prev is None else prev.union(outcome_items)
        check_per_item(items, self.terms)
        if self.irt is not None:
            value, var = self.irt(items)
        else:
            value, var = estimate_mean(items, self.terms, self.rungs.counts)
        lo, hi = interval(value, var, self.plan.config.fitness.z)
        fidelity = items.count / max(1, sum(self.rungs.counts.values()))
        ci = None if fidelity >= 1.0 else [round(lo, 6), round(hi, 6)]
        return Estimate([value], items.metrics(), items, fidelity, ci, None)

    def recorded(self, ev: Evaluation, rec: TrialRecord, items: ItemScores | None) -> None:
        """The line of `ev` is on disk: update the candidate (racing)."""
        act = self.active[ev.proposal]
        act.in_flight = False
        act.last = rec
        if self.racing and rec.ok and ev.rung is not None and items is not None:
            result = RungResult(rec.trial, ev.rung, items, rec.fitness[0])
            act.race.results[ev.rung] = result
            self._remember(result, rec)

    def decide(self, incumbent: float | None) -> list[Active]:
        """Candidates whose score is final now (the caller tells them); queues the evaluations
        the others need next."""
        final: list[Active] = []
        for act in list(self.active.values()):
            if act.last is not None and not act.in_flight and (not self.racing or not act.last.ok):
                act.final_trial = act.last.trial  # full fidelity, or failed: told as it is
                final.append(act)
        for act in final:
            del self.active[act.prop.id]
        if not self.racing or self.rungs is None:
            return final
        ctx = Context(self.plan.config.fitness, self.rungs, self.terms)
        waiting = {e.proposal for e in self.ready} | {
            k for k, a in self.active.items() if a.in_flight
        }
        if self.generational:
            members = list(self.active.values())
            if members and self.cohort_closed and not waiting:
                plan = race_cohort([a.race for a in members], incumbent, ctx)
                final += self._apply(plan)
            return final
        for act in list(self.active.values()):
            if act.prop.id not in waiting and act.race.results:
                final += self._apply(halve_async(act.race, self.history, incumbent, ctx))
        return final

    def _apply(self, plan: Plan) -> list[Active]:
        for job in plan.jobs:
            self.ready.append(Evaluation(job.key, job.rung, job.scored))
        done = []
        for key, rung in (plan.final or {}).items():
            act = self.active.pop(key)
            act.final_trial = act.race.results[rung].trial
            done.append(act)
        return done

    def pop_ready(self) -> Evaluation:
        ev = self.ready.popleft()
        self.active[ev.proposal].in_flight = True
        return ev


def check_per_item(items: ItemScores, terms: tuple[Term, ...]) -> None:
    """Racing estimates a fitness from item values: each fitness metric must have one per item."""
    missing = [
        f"{t.task}/{t.metric}" for t in terms if t.metric not in items.values.get(t.task, {})
    ]
    if missing:
        raise TaskError(
            f"fitness.fidelity racing needs each fitness metric per item; {missing[0]} is "
            "computed over the whole task (not a mean of per-item values): use fidelity full"
        )

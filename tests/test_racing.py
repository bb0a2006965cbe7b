"""Racing decisions: cohorts race until the top half is settled, ASHA promotes the top 1/eta,
the incumbent rule; every plan recomputed from the same results is the same plan."""

from __future__ import annotations

import numpy as np

from evomerge.fidelity import FitnessConfig, Rungs, Term, estimate_mean
from evomerge.items import ItemScores
from evomerge.racing import Candidate, Context, RungResult, halve_async, race_cohort

COUNTS = {"t": 300}
CFG = FitnessConfig(fidelity="racing", rungs=3, eta=3, confidence=0.9)
RUNGS = Rungs.build(COUNTS, CFG, seed=0)
CTX = Context(CFG, RUNGS, (Term("t", "acc", 1.0),))
U = np.random.default_rng(7).random(300)  # item difficulty, shared: paired comparisons


def answers(p: float) -> np.ndarray:
    """A candidate of skill p answers item i when U[i] < p (easier items first)."""
    return (p > U).astype(float)


class Sim:
    """Runs plans against simulated candidates, as the study loop does with real ones."""

    def __init__(self, skills: dict[int, float]) -> None:
        self.skills = skills
        self.cands = {k: Candidate(k) for k in skills}
        self.trial = 0
        self.history: list[RungResult] = []
        self.jobs_run: list[tuple[int, int]] = []

    def run(self, key: int, rung: int) -> None:
        ids = RUNGS.sets[rung]["t"]
        items = ItemScores.from_lists({"t": ids}, {"t": {"acc": answers(self.skills[key])[ids]}})
        est = estimate_mean(items, CTX.terms, COUNTS)[0]
        res = RungResult(self.trial, rung, items, est)
        self.trial += 1
        self.cands[key].results[rung] = res
        self.history.append(res)
        self.jobs_run.append((key, rung))

    def cohort(self, incumbent: float | None) -> dict[int, int]:
        while True:
            plan = race_cohort(list(self.cands.values()), incumbent, CTX)
            if plan.final is not None:
                return dict(plan.final)
            for job in plan.jobs:
                self.run(job.key, job.rung)


def test_clear_members_stop_early_close_ones_race_on() -> None:
    skills = {0: 0.95, 1: 0.9, 2: 0.1, 3: 0.05, 4: 0.50, 5: 0.51, 6: 0.52, 7: 0.49}
    sim = Sim(skills)
    final = sim.cohort(incumbent=1.5)  # nothing beats the incumbent: no full promotions
    assert final[0] == 0 and final[2] == 0 and final[3] == 0  # settled on rung 0
    assert max(final[k] for k in (4, 5, 6, 7)) >= 1  # the close ones needed more items
    scored = sum(c.results[max(c.results)].items.count for c in sim.cands.values())
    assert scored < 0.7 * 8 * 300  # the four near-ties (0.49..0.52) race on to every item
    # the same results give the same plan, however often it is recomputed
    assert race_cohort(list(sim.cands.values()), 1.5, CTX).final == final


def test_incumbent_rule_scores_a_new_best_on_every_item() -> None:
    sim = Sim({0: 0.95, 1: 0.2, 2: 0.1, 3: 0.15})
    final = sim.cohort(incumbent=0.5)
    assert final[0] == RUNGS.last  # beat the incumbent: scored in full before being told
    assert sim.cands[0].results[RUNGS.last].items.count == 300
    sim = Sim({0: 0.95, 1: 0.2, 2: 0.1, 3: 0.15})
    final = sim.cohort(incumbent=None)  # no full score yet: the best estimate gets one
    assert final[0] == RUNGS.last and all(final[k] < RUNGS.last for k in (1, 2, 3))


def test_asha_promotes_the_top_third_of_each_rung() -> None:
    skills = {k: p for k, p in enumerate([0.3, 0.6, 0.2, 0.9, 0.1, 0.5, 0.4, 0.8, 0.7])}
    sim = Sim(skills)
    finals = {}
    for key in skills:  # one worker: candidates arrive one after the other
        while True:
            if not sim.cands[key].results:
                sim.run(key, 0)
            plan = halve_async(sim.cands[key], sim.history, incumbent=2.0, ctx=CTX)
            if plan.final is not None:
                finals[key] = plan.final[key]
                break
            for job in plan.jobs:
                sim.run(job.key, job.rung)
    assert finals[0] == RUNGS.last  # first on every rung: the top third of one, each time
    assert finals[2] == 0 and finals[4] == 0  # worse than a third of their rung-0 peers
    assert finals[3] == 2  # the best climbs to every item
    promoted_from_0 = [k for k, r in finals.items() if r >= 1]
    assert len(promoted_from_0) <= 1 + len(skills) // 3 + 1
    # recomputed later, with more history, a decision stays what it was
    for key, rung in finals.items():
        assert halve_async(sim.cands[key], sim.history, 2.0, CTX).final == {key: rung}


def test_halving_cohort_promotes_the_top_third_of_each_rung_and_costs_a_fixed_share() -> None:
    cfg = FitnessConfig(fidelity="racing", rungs=3, eta=3, cohort_rule="halving")
    ctx = Context(cfg, RUNGS, CTX.terms)
    skills = {0: 0.95, 1: 0.9, 2: 0.1, 3: 0.05, 4: 0.50, 5: 0.51, 6: 0.52, 7: 0.49}
    sim = Sim(skills)
    while True:
        plan = race_cohort(list(sim.cands.values()), 2.0, ctx)  # no member beats 2.0
        if plan.final is not None:
            final = dict(plan.final)
            break
        for job in plan.jobs:
            sim.run(job.key, job.rung)
    # 8 on rung 0, ceil(8/3) = 3 on rung 1, ceil(3/3) = 1 on every item, near-ties or not
    assert sorted(final.values()) == [0, 0, 0, 0, 0, 1, 1, 2]
    assert final[0] == 2 or final[1] == 2  # the best of rung 1 climbs
    assert all(final[k] == 0 for k in (2, 3))
    sizes = [RUNGS.size(r) for r in range(3)]
    assert sizes[-1] == 300
    scored = sum(c.results[max(c.results)].items.count for c in sim.cands.values())
    assert scored == 5 * sizes[0] + 2 * sizes[1] + sizes[2]
    assert scored < 0.35 * 8 * 300
    assert race_cohort(list(sim.cands.values()), 2.0, ctx).final == final

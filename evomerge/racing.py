"""Racing: which candidates get more fitness items, and when a candidate's score is final.

Two policies, chosen by what the optimizer is, never by its name:

- Generational optimizers (CMA-ES: `ask` waits until a generation is told) need only the ranking
  of a generation's best: `race_cohort` scores every member on rung 0, then, phase by phase,
  stops each member whose place is settled (better than at least lambda - mu others, or worse
  than at least mu others, at the study's confidence, on paired differences over the items both
  were scored on) and promotes the rest to the next rung, until none is left or they reach every
  item (uncertainty handling by racing: Heidrich-Meisner and Igel 2009; Hansen et al. 2009).
- Asynchronous optimizers (Optuna's samplers): `halve_async` is asynchronous successive
  halving (ASHA, Li et al. 2020): a candidate is promoted from rung k when its estimate is in the
  top 1/eta of the rung-k estimates recorded so far.

Both end with the incumbent rule: a candidate whose estimate beats the best full-fidelity score
so far is scored on every item before it is told, so best/ and exports never rest on a partial
score. Every decision is a pure function of recorded results (recomputed from scratch each time),
so a resumed study takes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from evomerge.fidelity import FitnessConfig, Rungs, Term, paired_difference
from evomerge.items import ItemScores


@dataclass(frozen=True)
class RungResult:
    """A candidate's state after one evaluation: every item scored so far, and the estimate."""

    trial: int  # the trials.jsonl line
    rung: int
    items: ItemScores  # cumulative over the candidate's rungs
    estimate: float  # the fitness estimate recorded (the value the optimizer would be told)


@dataclass
class Candidate:
    key: int  # the optimizer's proposal id
    results: dict[int, RungResult] = field(default_factory=dict)  # rung -> result


@dataclass(frozen=True)
class Job:
    """Score `key` on the items of `rung` it lacks (it has those of rung `scored`)."""

    key: int
    rung: int
    scored: int | None


@dataclass(frozen=True)
class Plan:
    """Either jobs still needed, or every candidate's final rung (its score is told)."""

    jobs: tuple[Job, ...] = ()
    final: Mapping[int, int] | None = None


@dataclass(frozen=True)
class Context:
    config: FitnessConfig
    rungs: Rungs
    terms: Sequence[Term]

    @property
    def last(self) -> int:
        return self.rungs.last


def race_cohort(members: Sequence[Candidate], incumbent: float | None, ctx: Context) -> Plan:
    """The generational race over one cohort (see the module docstring)."""
    lam = len(members)
    mu = max(1, lam // 2)  # pycma's default parent number
    undecided = list(members)
    at: dict[int, int] = {}
    for k in range(ctx.last + 1):
        missing = [c for c in undecided if k not in c.results]
        if missing:
            return Plan(jobs=tuple(Job(c.key, k, k - 1 if k else None) for c in missing))
        for c in undecided:
            at[c.key] = k
        if k == ctx.last:
            break
        if ctx.config.cohort_rule == "halving":
            undecided = _top_fraction(undecided, k, ctx.config.eta)
        else:
            settled = _settled(members, undecided, at, lam, mu, ctx)
            undecided = [c for c in undecided if c.key not in settled]
        if not undecided:
            break
    return _with_incumbent_rule(members, at, incumbent, ctx)


def _top_fraction(racing: Sequence[Candidate], k: int, eta: float) -> list[Candidate]:
    """The best ceil(n / eta) of the members still racing, by their rung-k estimates (ties: the
    earlier proposal): successive halving inside one generation, so a generation costs
    lambda x (rung 0) + lambda / eta x (rung 1) + ... whatever the noise."""
    keep = math.ceil(len(racing) / eta)
    ranked = sorted(racing, key=lambda c: (-c.results[k].estimate, c.key))
    return ranked[:keep]


def _settled(
    members: Sequence[Candidate],
    undecided: Sequence[Candidate],
    at: Mapping[int, int],
    lam: int,
    mu: int,
    ctx: Context,
) -> set[int]:
    """Keys of the undecided members whose side of the top-mu cut is sure."""
    counts = ctx.rungs.counts
    z = ctx.config.z
    out = set()
    for c in undecided:
        wins = losses = 0
        mine = c.results[at[c.key]].items
        for other in members:
            if other.key == c.key:
                continue
            diff, var = paired_difference(
                mine, other.results[at[other.key]].items, ctx.terms, counts
            )
            half = z * math.sqrt(var)
            wins += diff - half > 0
            losses += diff + half < 0
        if wins >= lam - mu or losses >= mu:
            out.add(c.key)
    return out


def halve_async(
    candidate: Candidate, history: Sequence[RungResult], incumbent: float | None, ctx: Context
) -> Plan:
    """ASHA for one candidate; `history` is every recorded result of every candidate. The
    decision at rung k looks only at results recorded up to the candidate's own rung-k result,
    so it is the same however late it is recomputed."""
    k = 0
    while k < ctx.last:
        mine = candidate.results[k]
        peers = [r.estimate for r in history if r.rung == k and r.trial <= mine.trial]
        better = sum(e > mine.estimate for e in peers)
        if better >= max(1, math.ceil(len(peers) / ctx.config.eta)):
            break  # not in the top 1/eta of its rung: it stops here
        if k + 1 not in candidate.results:
            return Plan(jobs=(Job(candidate.key, k + 1, k),))
        k += 1
    return _with_incumbent_rule([candidate], {candidate.key: k}, incumbent, ctx)


def _with_incumbent_rule(
    members: Sequence[Candidate], at: Mapping[int, int], incumbent: float | None, ctx: Context
) -> Plan:
    """Promote to every item each member whose estimate beats the best full score (the
    incumbent before this cohort, or a member that reached every item while racing); with no
    full score yet, the member with the best estimate, so that there is one."""
    best = incumbent
    for c in members:
        if at[c.key] == ctx.last:
            e = c.results[ctx.last].estimate
            best = e if best is None else max(best, e)
    first = None
    if best is None:  # nothing at full fidelity yet: the best estimate goes first
        first = max(members, key=lambda c: (c.results[at[c.key]].estimate, -c.key)).key
    jobs = []
    final = {}
    for c in members:
        k = at[c.key]
        beats = c.key == first if best is None else c.results[k].estimate > best
        if k < ctx.last and beats:
            if ctx.last not in c.results:
                jobs.append(Job(c.key, ctx.last, k))
                continue
            k = ctx.last
        final[c.key] = k
    if jobs:
        return Plan(jobs=tuple(jobs))
    return Plan(final=final)

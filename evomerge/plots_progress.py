"""Plots of how a search went (written by `evomerge report` and `export` beside fitness.png):

- best_scores.png: each task's metrics of the best candidate so far, over trials; where the
  fitness rises while one task falls, the search traded that task away.
- generations.png: the distribution of the population's fitness per generation (CMA-ES), or per
  window of `popsize` trials for asynchronous optimizers; a spread that shrinks while the best
  stalls is a search that has converged.
- utilization.png: when each worker evaluated (a Gantt chart per worker, from the trials' start
  and end times, evomerge.run_metrics): idle gaps at generation ends or between dispatches are
  the white space; the utilization fraction is in the title.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from evomerge.plots import new_figure, to_png
from evomerge.run_metrics import evaluation_intervals, utilization
from evomerge.runstore import TrialRecord


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def best_so_far(records: Sequence[TrialRecord]) -> list[tuple[int, TrialRecord]]:
    """(trial, the best so far after it) for every trial from the first success on, by the rule
    of runstore.best_trial: the highest first objective on every fitness item, earliest on ties."""
    out: list[tuple[int, TrialRecord]] = []
    best: TrialRecord | None = None
    for r in records:
        full = r.status == "ok" and r.ok and r.fidelity >= 1.0
        if full and (best is None or r.fitness[0] > best.fitness[0]):
            best = r
        if best is not None:
            out.append((r.trial, best))
    return out


def best_scores_figure(records: Sequence[TrialRecord]) -> Any:
    """One step line per task and metric of the best so far; None before any success."""
    steps = best_so_far(records)
    if not steps:
        return None
    keys = [(t, m) for t, ms in steps[-1][1].scores.items() for m in _numbers(ms)]
    fig, axes = new_figure(1, 1, (7.5, 3.8))
    ax = axes[0, 0]
    xs = [x for x, _ in steps]
    for task, metric in keys:
        ys = [_numbers(b.scores.get(task, {})).get(metric, math.nan) for _, b in steps]
        ax.step(xs, ys, where="post", label=f"{task} {metric}")
    for x, b in steps:  # mark where the best changed
        if b.trial == x:
            ax.axvline(x, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("trial")
    ax.set_ylabel("metric of the best so far")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(f"per-task metrics of the best so far (best: trial {steps[-1][1].trial})")
    return fig


def generation_size(optimizer: str, options: Mapping[str, Any], genes: int) -> tuple[int, bool]:
    """(candidates per generation, whether the optimizer is generational): the study's popsize
    or population_size, else the sampler's own default for it, else pycma's 4 + 3 ln(genes)."""
    from evomerge.optimizers import OPTIMIZERS

    cls = OPTIMIZERS.get(optimizer, where="optimizer.name")
    size = options.get("popsize") or options.get("population_size")
    sampler = getattr(cls.Options, "sampler", None)
    if not size and sampler is not None:  # an Optuna sampler: its constructor's default
        params = inspect.signature(sampler().__init__).parameters
        for name in ("population_size", "popsize"):
            default = params[name].default if name in params else None
            if isinstance(default, int) and not isinstance(default, bool):
                size = default
    if not size:
        size = 4 + int(3 * math.log(max(genes, 1)))
    return int(size), bool(cls.generational)


def generation_fitness(records: Sequence[TrialRecord], size: int) -> list[list[float]]:
    """The first objective of each candidate of generation g (proposals g*size to g*size+size-1:
    proposal ids count asks, so a generational optimizer's generations are these blocks), from
    its last line (racing: the estimate it was told; a duplicate: the fitness it repeats);
    failed candidates are left out."""
    last: dict[int, TrialRecord] = {}
    for r in records:
        last[r.proposal] = r
    if not last:
        return []
    out: list[list[float]] = [[] for _ in range(max(last) // size + 1)]
    for pid in sorted(last):
        r = last[pid]
        if r.ok and r.fitness:
            out[pid // size].append(r.fitness[0])
    return out


def generations_figure(
    records: Sequence[TrialRecord], size: int, generational: bool, optimizer: str = ""
) -> Any:
    """Box plot per generation (points over it) and the best so far; None without a success."""
    data = generation_fitness(records, size)
    if not any(data):
        return None
    import numpy as np

    fig, axes = new_figure(1, 1, (max(6.0, min(0.22 * len(data) + 3, 16)), 3.8))
    ax = axes[0, 0]
    pos = [g for g, v in enumerate(data) if v]
    ax.boxplot([data[g] for g in pos], positions=pos, widths=0.6, showfliers=False)
    rng = np.random.default_rng(0)
    for g in pos:
        jitter = rng.uniform(-0.18, 0.18, len(data[g]))
        ax.scatter(g + jitter, data[g], s=8, alpha=0.5, color="tab:blue", zorder=3)
    best = np.maximum.accumulate([max(data[g]) for g in pos])
    ax.step(pos, best, where="post", color="tab:orange", label="best so far")
    step = max(1, len(data) // 15)
    ax.set_xticks(range(0, len(data), step), [str(g) for g in range(0, len(data), step)])
    unit = "generation" if generational else f"window of {size} trials"
    ax.set_xlabel(unit)
    ax.set_ylabel("fitness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    what = f"population {size}" if generational else "asynchronous"
    ax.set_title(f"fitness per {unit} ({optimizer + ', ' if optimizer else ''}{what})")
    return fig


def utilization_figure(records: Sequence[TrialRecord]) -> Any:
    """Each worker's evaluations as bars on a time axis; None without timed evaluations.
    Sessions (a stop and a resume) are drawn end to end, the stopped time cut out and a dashed
    line where the next session begins."""
    ivs = evaluation_intervals(records)
    use = utilization(ivs)
    if use is None:
        return None
    sessions = use.sessions
    shift = [sessions[0][0]]  # time subtracted in each session: the gaps before it
    for (_, prev_end), (start, _) in itertools.pairwise(sessions):
        shift.append(shift[-1] + start - prev_end)
    span = sum(b - a for a, b in sessions)
    scale, unit = (60.0, "min") if span > 600 else (1.0, "s")

    def place(t: float) -> float:
        k = max(i for i, (a, _) in enumerate(sessions) if a <= t)
        return (t - shift[k]) / scale

    rows = {w: i for i, w in enumerate(use.workers)}
    fig, axes = new_figure(1, 1, (9, 1.2 + 0.42 * min(len(rows), 40)))
    ax = axes[0, 0]
    for ok, color in ((True, "tab:blue"), (False, "tab:red")):
        for w, row in rows.items():
            bars = [
                (place(iv.start), (iv.end - iv.start) / scale)
                for iv in ivs
                if iv.worker == w and iv.ok == ok
            ]
            if bars:
                ax.broken_barh(bars, (row - 0.4, 0.8), color=color, linewidth=0)
    for a, _ in sessions[1:]:
        ax.axvline(place(a), color="0.3", ls="--", lw=1)
    ax.set_yticks(range(len(rows)), [f"{w} ({100 * use.of(w):.0f}%)" for w in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, span / scale)
    cut = "; the stopped time between sessions cut out" if len(sessions) > 1 else ""
    ax.set_xlabel(f"{unit} since the first evaluation{cut}")
    ax.grid(axis="x", alpha=0.3)
    parts = [f"{len(rows)} worker{'s' if len(rows) != 1 else ''}"]
    if len(sessions) > 1:
        parts.append(f"{len(sessions)} sessions")
    if any(not iv.ok for iv in ivs):
        parts.append("red: failed")
    ax.set_title(f"worker utilization {100 * use.fraction:.1f}% ({', '.join(parts)})")
    return fig


def progress_plots(
    records: Sequence[TrialRecord], size: int, generational: bool, optimizer: str = ""
) -> dict[str, bytes]:
    """File name -> PNG bytes of the plots above that apply (each needs a success or a timed
    evaluation)."""
    figs = {
        "best_scores.png": best_scores_figure(records),
        "generations.png": generations_figure(records, size, generational, optimizer),
        "utilization.png": utilization_figure(records),
    }
    return {name: to_png(fig) for name, fig in figs.items() if fig is not None}

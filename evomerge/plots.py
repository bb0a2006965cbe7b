"""Plots of a run (matplotlib, Agg backend; no display needed): PNG bytes or figures.

- fitness.png: every trial's fitness (one panel per objective) and the best so far.
- coefficients.png: the winner's per-layer coefficients, a heatmap (layer group x model) per
  searched parameter and tensor group.
- pareto.png: with several objectives, each pair of objectives and its non-dominated front.
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any

from evomerge.recipe import Recipe
from evomerge.runstore import TrialRecord


def new_figure(nrows: int, ncols: int, figsize: tuple[float, float], **kw: Any) -> tuple[Any, Any]:
    """A Figure with an Agg canvas, without pyplot: no global backend or figure state is touched
    (safe in notebooks, threads and headless servers)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def to_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def fitness_figure(
    records: Sequence[TrialRecord], names: Sequence[str], chosen: int | None = None
) -> Any:
    """Fitness per trial (dots), best so far (line), failed trials (red x at the bottom).

    With racing, a line scored on a subset of the items is a hollow dot and never makes the best
    so far: the line follows the rule of runstore.best_trial (every item), so it ends at the
    exported candidate rather than at a lucky subset estimate."""
    n = max(len(names), 1)
    fig, axes = new_figure(n, 1, (7, 2.6 * n + 0.6), sharex=True)
    for k, ax in enumerate(axes[:, 0]):
        scored = [r for r in records if r.ok and len(r.fitness or []) > k]
        full = [r for r in scored if r.fidelity >= 1.0]
        partial = [r for r in scored if r.fidelity < 1.0]
        xs = [r.trial for r in full]
        ys = [r.fitness[k] for r in full]
        if partial:
            ax.scatter(
                [r.trial for r in partial],
                [r.fitness[k] for r in partial],
                s=14,
                facecolors="none",
                edgecolors="tab:gray",
                alpha=0.6,
                label="subset estimate (racing)",
            )
        ax.scatter(xs, ys, s=14, color="tab:blue", alpha=0.7, label="trial (every item)")
        steps = list(itertools.accumulate(ys, max))
        if xs:
            ax.step(xs, steps, where="post", color="tab:orange", label="best so far")
        failed = [r.trial for r in records if not r.ok]
        if failed:
            everything = ys + [r.fitness[k] for r in partial]
            low = min(everything) if everything else 0.0
            ax.scatter(failed, [low] * len(failed), marker="x", color="tab:red", label="failed")
        if chosen is not None:
            hit = [(x, y) for x, y in zip(xs, ys, strict=True) if x == chosen]
            if hit:
                ax.scatter(
                    *hit[0], marker="*", s=160, color="tab:green", zorder=3, label="exported"
                )
        ax.set_ylabel(names[k] if k < len(names) else "fitness")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="lower right", fontsize=8)
    axes[-1, 0].set_xlabel("trial")
    fig.suptitle("fitness per trial")
    return fig


def coefficient_panels(
    recipe: Recipe, searched: Iterable[str] | None = None
) -> dict[str, tuple[list[str], list[str], list[list[float]]]]:
    """{panel title: (row labels, column labels, values)}; NaN where a row lacks the value.

    A panel is one numeric parameter in one tensor group; rows are the recipe's sections
    (layer groups, then 'global'), columns the models (or 'all' for global parameters).
    """
    keep = set(searched) if searched is not None else None
    filters = list(dict.fromkeys(s.filter for s in recipe.sections))
    methods = {s.method for s in recipe.sections}
    models = [m for m in recipe.models if any(m in s.models for s in recipe.sections)]
    cells: dict[str, dict[str, dict[str, float]]] = {}  # panel -> row -> column -> value
    for s in recipe.sections:
        row = "global" if s.layers is None else _layers(s.layers)
        if len(methods) > 1:
            row = f"{row} {s.method}"
        group = f" [{s.filter or 'rest'}]" if len(filters) > 1 else ""
        for m, params in s.models.items():
            for p, v in params.items():
                if _number(v) and (keep is None or p in keep):
                    cells.setdefault(p + group, {}).setdefault(row, {})[m] = float(v)
        for p, v in s.parameters.items():
            if _number(v) and (keep is None or p in keep):
                cells.setdefault(p + group, {}).setdefault(row, {})["all"] = float(v)
    out = {}
    for panel, rows in cells.items():
        cols = [m for m in [*models, "all"] if any(m in r for r in rows.values())]
        values = [[rows[r].get(c, math.nan) for c in cols] for r in rows]
        out[panel] = (list(rows), cols, values)
    return out


def _layers(r: tuple[int, int]) -> str:
    return f"L{r[0]}" if r[1] - r[0] == 1 else f"L{r[0]}-{r[1] - 1}"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def coefficients_figure(
    recipe: Recipe, searched: Iterable[str] | None = None, title: str = ""
) -> Any:
    """Heatmaps of the recipe's per-layer values; None when it has no numeric parameter."""
    import numpy as np

    panels = coefficient_panels(recipe, searched)
    if not panels:
        return None
    n = len(panels)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    tallest = max(len(r) for r, _, _ in panels.values())
    widest = max(len(c) for _, c, _ in panels.values())
    fig, axes = new_figure(
        nrows, ncols, (ncols * (1.6 + 0.9 * widest), nrows * (1.2 + 0.32 * tallest))
    )
    for ax, (panel, (rows, cols, values)) in zip(axes.flat, panels.items(), strict=False):
        data = np.array(values, dtype=float)
        im = ax.imshow(data, aspect="auto", cmap="viridis")
        ax.set_title(panel, fontsize=9)
        ax.set_xticks(range(len(cols)), cols, fontsize=8, rotation=30, ha="right")
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        if data.size <= 240:
            lo, hi = np.nanmin(data), np.nanmax(data)
            for (i, j), v in np.ndenumerate(data):
                if math.isfinite(v):
                    light = hi > lo and (v - lo) / (hi - lo) < 0.5
                    ax.text(
                        j,
                        i,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if light else "black",
                    )
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title or "per-layer coefficients of the winner")
    fig.tight_layout()
    return fig


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points (every objective maximized)."""
    front = []
    for i, p in enumerate(points):
        dominated = any(
            all(a >= b for a, b in zip(q, p, strict=True))
            and any(a > b for a, b in zip(q, p, strict=True))
            for j, q in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def pareto_figure(
    records: Sequence[TrialRecord], names: Sequence[str], chosen: int | None = None
) -> Any:
    """Each pair of objectives (up to three pairs): all trials and the front over all objectives."""
    if len(names) < 2:
        return None
    ok = [r for r in records if r.ok and r.status == "ok" and len(r.fitness or []) == len(names)]
    if not ok:
        return None
    front = {ok[i].trial for i in pareto_front([r.fitness for r in ok])}
    pairs = [(a, b) for a in range(len(names)) for b in range(a + 1, len(names))][:3]
    fig, axes = new_figure(1, len(pairs), (4.4 * len(pairs), 4))
    for ax, (a, b) in zip(axes[0], pairs, strict=True):
        ax.scatter(
            [r.fitness[a] for r in ok], [r.fitness[b] for r in ok], s=14, color="0.6", label="trial"
        )
        pf = sorted((r for r in ok if r.trial in front), key=lambda r: r.fitness[a])
        ax.plot(
            [r.fitness[a] for r in pf],
            [r.fitness[b] for r in pf],
            "o-",
            color="tab:red",
            ms=5,
            label="Pareto front",
        )
        for r in ok:
            if r.trial == chosen:
                ax.scatter(
                    r.fitness[a],
                    r.fitness[b],
                    marker="*",
                    s=180,
                    color="tab:green",
                    zorder=3,
                    label="exported",
                )
        ax.set_xlabel(names[a])
        ax.set_ylabel(names[b])
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("objectives (all maximized)")
    fig.tight_layout()
    return fig


def run_plots(
    records: Sequence[TrialRecord],
    names: Sequence[str],
    recipe: Recipe | None,
    searched: Iterable[str] | None,
    chosen: int | None,
) -> dict[str, bytes]:
    """File name -> PNG bytes for every plot that applies to this run."""
    out = {"fitness.png": to_png(fitness_figure(records, names, chosen))}
    if recipe is not None:
        fig = coefficients_figure(
            recipe, searched, title=f"per-layer coefficients of trial {chosen}"
        )
        if fig is not None:
            out["coefficients.png"] = to_png(fig)
    fig = pareto_figure(records, names, chosen)
    if fig is not None:
        out["pareto.png"] = to_png(fig)
    return out

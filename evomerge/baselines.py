"""What the evolved merge is compared with, scored on the search and the held-out tasks.

Rows (the `kind` of report.json):
- `evolved`: the exported trial's recipe.
- `parent`: each source model alone (a passthrough recipe).
- `uniform`: linear, weight 1 per source, normalized: the plain average ("model soup").
- `task_arithmetic`: base + sum_i 1.0 * (source_i - base), lambda 1: mergekit's defaults and the
  classic form. (Weights 1/M would equal the uniform row exactly, so they are not repeated.)
- `ties`: TIES with weight 1, density 0.5, normalize true: mergekit's common example config.
- `greedy_soup`: sources sorted by their search-split score, each added to the uniform average
  when the soup's search score does not drop (Wortsman et al. 2022, Algorithm 1).
- `ensemble`: the parents' output ensemble (mean of their next-token probabilities): what merging
  into one model tries to approach, at M times the inference cost.

Recipe rows run through one Worker (in place, the study's own scorer); the ensemble swaps each
parent's weights into the same live model for every forward pass, so no model is loaded twice.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from evomerge.items import ItemScores
from evomerge.recipe import Recipe, Section
from evomerge.report_model import Kind, PrimaryMetric, ReportRow, Split
from evomerge.worker import Outcome, WorkerSpec

TIES_DENSITY = 0.5


@dataclass(frozen=True)
class Baseline:
    name: str
    kind: Kind
    recipe: Recipe


def _recipe(like: Recipe, section: Section) -> Recipe:
    """Same models, base, tokenizer, dtype and seed as the evolved recipe; one section."""
    return like.model_copy(update={"sections": [section], "slices": None})


def parent_recipe(like: Recipe, source: str) -> Recipe:
    return _recipe(like, Section(method="passthrough", models={source: {}}))


def soup_recipe(like: Recipe, members: Sequence[str]) -> Recipe:
    """Uniform average of `members`: a parent alone is its passthrough recipe, and members are
    put in the recipe's model order, so equal soups hash (and are scored) once."""
    if len(members) == 1:
        return parent_recipe(like, members[0])
    models = {m: {"weight": 1.0} for m in like.models if m in members}
    return _recipe(like, Section(method="linear", parameters={"normalize": True}, models=models))


def default_baselines(like: Recipe, sources: Sequence[str]) -> tuple[list[Baseline], list[str]]:
    """Parents, uniform, and (with a base model) task arithmetic and TIES; plus notes."""
    rows = [Baseline(f"parent {s}", "parent", parent_recipe(like, s)) for s in sources]
    rows.append(Baseline("uniform average", "uniform", soup_recipe(like, sources)))
    notes = []
    if like.base_model is None:
        notes.append("no models.base: task arithmetic and TIES need one and are left out")
        return rows, notes
    ta = Section(
        method="task_arithmetic",
        parameters={"lambda": 1.0, "normalize": False},
        models={s: {"weight": 1.0} for s in sources},
    )
    ties = Section(
        method="ties",
        parameters={"lambda": 1.0, "normalize": True},
        models={s: {"weight": 1.0, "density": TIES_DENSITY} for s in sources},
    )
    rows.append(Baseline("task arithmetic (w=1)", "task_arithmetic", _recipe(like, ta)))
    rows.append(Baseline(f"TIES (w=1, density {TIES_DENSITY})", "ties", _recipe(like, ties)))
    return rows, notes


def make_row(
    name: str,
    kind: Kind,
    scores: Mapping[str, Mapping[str, float]] | None,
    error: str | None,
    primary: Mapping[str, str],
) -> ReportRow:
    """One report row: the primary metric per task and their mean (None unless all are known)."""
    tasks: dict[str, float | None] = {}
    for task, metric in primary.items():
        value = (scores or {}).get(task, {}).get(metric)
        tasks[task] = None if value is None else float(value)
    known = [v for v in tasks.values() if v is not None]
    return ReportRow(
        name=name,
        kind=kind,
        mean=statistics.fmean(known) if known and len(known) == len(tasks) else None,
        tasks=tasks,
        metrics=None
        if scores is None
        else {t: {k: float(v) for k, v in m.items()} for t, m in scores.items()},
        error=error or None,
    )


class _Bar:
    """A rich progress bar with a changing label; silent unless stderr is a terminal."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._prog = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            self._prog = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            self._prog.start()
            self._task = self._prog.add_task("scoring", total=total)

    def label(self, text: str) -> None:
        if self._prog is not None:
            self._prog.update(self._task, description=text)

    def step(self) -> None:
        if self._prog is not None:
            self._prog.advance(self._task)

    def close(self) -> None:
        if self._prog is not None:
            self._prog.update(self._task, completed=self._prog.tasks[0].total)
            self._prog.stop()


@dataclass(frozen=True)
class Tables:
    search: tuple[ReportRow, ...]
    heldout: tuple[ReportRow, ...]
    primary: dict[Split, dict[str, PrimaryMetric]]  # split -> task -> its primary metric
    greedy_soup: tuple[str, ...]
    notes: tuple[str, ...]
    # split -> per row (in the order of its table) the items it was scored on; None: it failed
    items: dict[Split, tuple[ItemScores | None, ...]] = field(default_factory=dict)


def score_baselines(
    worker_spec: WorkerSpec,
    evolved: Recipe,
    evolved_name: str,
    sources: Sequence[str],
    search_key: Callable[[Mapping[str, Mapping[str, float]]], float],
    *,
    progress: bool = True,
) -> Tables:
    """Score the evolved recipe and every baseline on both splits with one worker.

    `search_key(scores)` ranks search-split scores for the greedy soup (the study's fitness).
    """
    from evomerge.worker import Worker

    splits: list[Split] = ["search"] + (["heldout"] if worker_spec.heldout else [])
    rows, notes = default_baselines(evolved, sources)
    rows.insert(0, Baseline(evolved_name, "evolved", evolved))
    extra_soups = max(len(sources) - 2, 0)  # soups of one or all members reuse parent/uniform
    bar = _Bar((len(rows) + 1) * len(splits) + extra_soups, progress)
    bar.label("loading the models and building the tasks")
    try:
        worker = Worker(worker_spec)
        primary = {
            sp: {
                t: PrimaryMetric(metric=m, higher_is_better=h)
                for t, (m, h) in worker.scorer(sp).primary_metrics().items()
            }
            for sp in splits
        }
    except BaseException:
        bar.close()
        raise
    keys = {sp: {t: pm.metric for t, pm in primary[sp].items()} for sp in splits}
    scored: dict[str, dict[str, tuple[Any, str | None]]] = {sp: {} for sp in splits}
    items: dict[str, dict[str, ItemScores | None]] = {sp: {} for sp in splits}
    by_recipe: dict[tuple[str, str], Outcome] = {}

    def outcome(recipe: Recipe, label: str, split: str) -> Outcome:
        key = (recipe.content_hash(), split)
        if key not in by_recipe:
            bar.label(f"scoring {label} ({split})")
            by_recipe[key] = worker.evaluate(recipe, split)
            bar.step()
        return by_recipe[key]

    def score(recipe: Recipe, label: str, split: str) -> tuple[Any, str | None]:
        out = outcome(recipe, label, split)
        return out.scores, out.error

    def keep(split: str, name: str, recipe: Recipe) -> None:
        out = outcome(recipe, name, split)
        scored[split][name] = (out.scores, out.error)
        items[split][name] = out.items if out.error is None else None

    try:
        for sp in splits:
            for b in rows:
                keep(sp, b.name, b.recipe)
        members = greedy_soup(evolved, sources, search_key, lambda r, n: score(r, n, "search"))
        soup = soup_recipe(evolved, members)
        soup_name = f"greedy soup ({', '.join(members)})"
        for sp in splits:
            keep(sp, soup_name, soup)
        rows.append(Baseline(soup_name, "greedy_soup", soup))
        ens_name = f"output ensemble ({len(sources)} parents)"
        for sp in splits:
            bar.label(f"scoring {ens_name} ({sp})")
            metrics, error, items[sp][ens_name] = _score_ensemble(worker, evolved, sources, sp)
            scored[sp][ens_name] = (metrics, error)
            bar.step()
    finally:
        bar.close()
    rows.append(Baseline(ens_name, "ensemble", evolved))
    tables = {
        sp: tuple(make_row(b.name, b.kind, *scored[sp][b.name], keys[sp]) for b in rows)
        for sp in splits
    }
    return Tables(
        tables["search"],
        tables.get("heldout", ()),
        primary,
        tuple(members),
        tuple(notes),
        {sp: tuple(items[sp][b.name] for b in rows) for sp in splits},
    )


def greedy_soup(
    like: Recipe,
    sources: Sequence[str],
    key: Callable[[Mapping[str, Mapping[str, float]]], float],
    score: Callable[[Recipe, str], tuple[Any, str | None]],
) -> list[str]:
    """Wortsman et al.'s greedy soup on the search split: best parent first, then each next
    parent kept if the soup's search score does not drop."""
    ranked = []
    for s in sources:
        scores, _ = score(parent_recipe(like, s), f"parent {s}")
        ranked.append((key(scores) if scores else float("-inf"), s))
    order = [s for _, s in sorted(ranked, key=lambda p: -p[0])]
    members = [order[0]]
    best = max(v for v, _ in ranked)
    for s in order[1:]:
        trial = [*members, s]
        scores, _ = score(soup_recipe(like, trial), f"soup + {s}")
        value = key(scores) if scores else float("-inf")
        if value >= best:
            members, best = trial, value
    return members


def _score_ensemble(
    worker: Any, like: Recipe, sources: Sequence[str], split: str
) -> tuple[Any, str | None, ItemScores | None]:
    from evomerge.ensemble import EnsembleForCausalLM
    from evomerge.errors import CandidateError
    from evomerge.scoring import Scorer

    recipes = [parent_recipe(like, s) for s in sources]
    activators = [lambda r=r: worker.merger.apply(r) for r in recipes]
    ensemble = EnsembleForCausalLM.swapping(worker.model, activators)
    settings = worker.spec.scoring if split == "search" else worker.spec.heldout
    try:
        scorer = Scorer(ensemble, worker.tokenizer, settings, fitness=False)
        result = scorer.score()
        return result.metrics, None, result.items
    except CandidateError as exc:
        return None, str(exc), None

"""The report of a run: its summary, the chosen trial, and the held-out table (evolved vs
baselines), built as a typed `Report` (evomerge.report_model) that report.json serializes.

`open_run` opens and validates a run directory once; `build_report` scores the baselines table
(evomerge.baselines) or reuses the one cached in RUN_DIR/report/ (evomerge.report_cache), gives
every row a paired bootstrap interval against the evolved row on the same items
(evomerge.report_compare), and sets the winner's recorded search fitness beside the report's own
full-fidelity re-measurement of it. The text forms are in evomerge.report_table, the model card
in evomerge.model_card.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge import __version__
from evomerge.errors import ConfigError, RunDirError
from evomerge.items import ItemScores
from evomerge.recipe import Recipe
from evomerge.report_cache import fingerprint, read_cached, read_items, write_items
from evomerge.report_model import (
    ModelsSummary,
    OptimizerSummary,
    PrimaryMetric,
    Report,
    ReportRow,
    RunSummary,
    SearchFitness,
    SpaceSummary,
    Split,
    TopTrial,
    TrialSummary,
)
from evomerge.runstore import RunStore, TrialRecord, best_trial

if TYPE_CHECKING:
    from evomerge.baselines import Tables
    from evomerge.config import StudyConfig
    from evomerge.study_plan import StudyPlan

NOT_COMPUTED = "held-out table not computed (run `evomerge report RUN_DIR`)"
NO_HELDOUT = "the study names no held-out tasks (tasks.heldout): only the search table"


@dataclass(frozen=True)
class RunView:
    """A run directory opened for reporting: its plan, trials, and the chosen trial's recipe."""

    store: RunStore
    plan: StudyPlan
    records: list[TrialRecord]
    record: TrialRecord
    recipe: Recipe

    @property
    def config(self) -> StudyConfig:
        return self.plan.config

    @property
    def sources(self) -> list[str]:
        return list(self.plan.models.sources)

    @property
    def objective_names(self) -> tuple[str, ...]:
        return tuple(self.plan.objective.names)

    def searched_params(self) -> set[str]:
        """Parameter names the space searches (not fixed values): what the heatmaps show."""
        from evomerge.space import Range

        out = set()
        for ms in self.plan.space.config.methods.values():
            out |= {p for p, v in {**ms.per_model, **ms.parameters}.items() if isinstance(v, Range)}
        return out


def select_trial(records: list[TrialRecord], trial: int | None, where: Path) -> TrialRecord:
    """The best successful trial, or trial `trial` (a duplicate stands for the trial it repeats)."""
    if trial is None:
        best = best_trial(records)
        if best is None:
            raise RunDirError(
                f"{where} has no successful trial yet ({len(records)} recorded); "
                f"run or resume the study first (`evomerge status {where}`)"
            )
        return best
    by_number = {r.trial: r for r in records}
    rec = by_number.get(trial)
    if rec is None:
        span = f"0-{len(records) - 1}" if records else "none yet"
        raise ConfigError(f"--trial {trial}: no such trial in {where} (trials: {span})")
    if rec.status == "duplicate" and rec.duplicate_of is not None:
        rec = by_number.get(rec.duplicate_of, rec)
    if not rec.ok:
        raise ConfigError(
            f"--trial {trial} failed ({rec.error or 'no fitness'}); pick a successful trial "
            f"(`evomerge status {where}` shows the best)"
        )
    return rec


def open_run(run_dir: str | Path, trial: int | None = None) -> RunView:
    """Open, validate (models, space, tasks) and decode the chosen trial's recipe."""
    from evomerge.study import load_run_config
    from evomerge.study_plan import build_plan

    store = RunStore.open(run_dir)
    records = store.read_trials()
    record = select_trial(records, trial, store.dir)
    plan = build_plan(load_run_config(store))
    recipe = plan.space.decode(record.genome)
    if recipe.content_hash() != record.recipe_hash:
        raise ConfigError(
            f"trial {record.trial} of {store.dir} now decodes to a different recipe than the one "
            f"it scored (hash {recipe.content_hash()} vs {record.recipe_hash}): the search space "
            "preset or a model path changed since the run; restore them to export this trial"
        )
    return RunView(store, plan, records, record, recipe)


def run_summary(view: RunView) -> RunSummary:
    cfg = view.config
    recs = view.records
    space = view.plan.space
    seconds = [r.seconds.get("total", 0.0) for r in recs if r.status != "duplicate"]
    return RunSummary(
        name=cfg.name,
        run_dir=str(view.store.dir),
        state=view.store.state().get("state"),
        trials=len(recs),
        budget=cfg.budget.max_trials,
        ok=sum(1 for r in recs if r.status == "ok" and r.ok),
        failed=sum(1 for r in recs if r.status == "failed"),
        duplicates=sum(1 for r in recs if r.status == "duplicate"),
        seconds_per_trial=round(statistics.fmean(seconds), 3) if seconds else None,
        optimizer=OptimizerSummary(name=cfg.optimizer.name, **cfg.optimizer.options),
        seed=cfg.seed,
        search_space=SpaceSummary(
            preset=cfg.search_space.get("preset"),
            description=space.config.description.strip(),
            methods=tuple(space.config.methods),
            granularity=space.config.granularity,
            genes=len(space.dimensions()),
        ),
        models=ModelsSummary(
            base=cfg.models.base, sources={s.name: s.path for s in cfg.models.sources}
        ),
        objectives=view.objective_names,
        search_tasks=tuple(cfg.tasks.search),
        heldout_tasks=tuple(cfg.tasks.heldout),
    )


def _trial_summary(view: RunView) -> TrialSummary:
    rec = view.record
    return TrialSummary(
        trial=rec.trial,
        fitness=tuple(rec.fitness or ()),
        scores=rec.scores,
        recipe_hash=rec.recipe_hash,
        is_best=rec.trial == (best_trial(view.records) or rec).trial,
    )


def _top_trials(records: list[TrialRecord], n: int = 5) -> tuple[TopTrial, ...]:
    top = sorted(
        (r for r in records if r.status == "ok" and r.ok), key=lambda r: (-r.fitness[0], r.trial)
    )
    return tuple(
        TopTrial(trial=r.trial, fitness=tuple(r.fitness), scores=r.scores) for r in top[:n]
    )


def _search_key(view: RunView) -> Callable[[Mapping[str, Mapping[str, float]]], float]:
    """Ranks search-split scores for the greedy soup: the study's fitness (the sum of the
    objectives when there are several; each is signed and weighted to be maximized)."""
    from evomerge.errors import CandidateError

    objective = view.plan.objective

    def key(scores: Mapping[str, Mapping[str, float]]) -> float:
        try:
            return math.fsum(objective.evaluate(scores))
        except CandidateError:
            return float("-inf")

    return key


def _cached_table(cached: Report) -> dict[str, Any]:
    """The fields of a cached report that hold the scored table (and its notes)."""
    keys = ("scored", "heldout", "search", "primary_metrics", "greedy_soup", "comparison")
    return {k: getattr(cached, k) for k in (*keys, "notes", "seconds")}


def _compared(
    search: Sequence[ReportRow],
    heldout: Sequence[ReportRow],
    primary: Mapping[Split, Mapping[str, PrimaryMetric]],
    items: Mapping[Split, Sequence[ItemScores | None]],
) -> dict[str, Any]:
    """The rows with their intervals against the evolved row, and the comparison."""
    from evomerge.report_compare import compare_tables

    rows, comparison = compare_tables(
        {"search": search, "heldout": heldout},
        items,
        {sp: {t: pm.metric for t, pm in per.items()} for sp, per in primary.items()},
    )
    return {"search": rows["search"], "heldout": rows["heldout"], "comparison": comparison}


def _from_cache(view: RunView, cached: Report, heldout: bool) -> dict[str, Any] | None:
    """The cached table; its intervals recomputed from items.npz when they were computed
    otherwise (or not at all: an earlier version). None: score again (`heldout`) instead of
    showing a table without them."""
    from evomerge.report_compare import settings

    table = _cached_table(cached)
    if cached.comparison is not None and cached.comparison.same_settings(settings()):
        return table
    items = read_items(view.store.dir, cached)
    if items is not None:
        return {**table, **_compared(cached.search, cached.heldout, cached.primary_metrics, items)}
    return None if heldout else table


def _score_table(view: RunView, progress: bool) -> tuple[dict[str, Any], Tables]:
    """Score the evolved recipe and the baselines on both splits: the report's table fields,
    and the scored tables (with their items)."""
    from evomerge.baselines import score_baselines

    t0 = time.perf_counter()
    tables = score_baselines(
        view.plan.worker_spec,
        view.recipe,
        f"evolved (trial {view.record.trial})",
        view.sources,
        _search_key(view),
        progress=progress,
    )
    notes = list(tables.notes)
    if not view.config.tasks.heldout:
        notes.append(NO_HELDOUT)
    return {
        "scored": True,
        "primary_metrics": tables.primary,
        "greedy_soup": tables.greedy_soup,
        **_compared(tables.search, tables.heldout, tables.primary, tables.items),
        "notes": tuple(notes),
        "seconds": round(time.perf_counter() - t0, 2),
    }, tables


def search_fitness(view: RunView, search: Sequence[ReportRow]) -> SearchFitness | None:
    """The trial's recorded fitness beside the same fitness computed from the report's own
    scoring of the evolved model on every search item (the full-fidelity re-measurement)."""
    from evomerge.errors import CandidateError

    evolved = next((r for r in search if r.kind == "evolved"), None)
    if evolved is None:
        return None
    try:
        remeasured = (
            None if evolved.metrics is None else view.plan.objective.evaluate(evolved.metrics)
        )
    except CandidateError:
        remeasured = None
    return SearchFitness(
        trial=view.record.trial,
        trials=sum(1 for r in view.records if r.status == "ok" and r.ok),
        fidelity=view.config.fitness.fidelity,
        recorded=tuple(view.record.fitness or ()),
        remeasured=remeasured,
    )


def report_fingerprint(view: RunView) -> str:
    spec = view.plan.worker_spec
    return fingerprint(view.recipe, spec.scoring, spec.heldout, view.config.dtype)


def build_report(
    view: RunView, *, heldout: bool = True, progress: bool = True, use_cache: bool = True
) -> Report:
    """The report of the view's trial. With `heldout`, scores (or reuses) the baselines table;
    a table scored here leaves its rows' item values in RUN_DIR/report/items.npz."""
    fp = report_fingerprint(view)
    head = {
        "evomerge_version": __version__,
        "created": time.time(),
        "run": run_summary(view),
        "trial": _trial_summary(view),
        "top_trials": _top_trials(view.records),
        "fingerprint": fp,
    }
    cached = read_cached(view.store.dir, fp) if use_cache else None
    table = None if cached is None else _from_cache(view, cached, heldout)
    if table is not None:
        fit = search_fitness(view, table["search"])
        return Report(**head, **table, search_fitness=fit, cached=True)
    if not heldout:
        return Report(**head, notes=(NOT_COMPUTED,))
    table, tables = _score_table(view, progress)
    report = Report(**head, **table, search_fitness=search_fitness(view, table["search"]))
    write_items(view.store.dir, report, tables.items)
    return report


def report_plots(view: RunView) -> dict[str, bytes]:
    """fitness.png, coefficients.png, (several objectives) pareto.png, and how the search went:
    best_scores.png, generations.png, utilization.png (evomerge.plots_progress), as PNG bytes."""
    from evomerge.plots import run_plots
    from evomerge.plots_progress import generation_size, progress_plots

    plots = run_plots(
        view.records, view.objective_names, view.recipe, view.searched_params(), view.record.trial
    )
    opt = view.config.optimizer
    size, generational = generation_size(opt.name, opt.options, len(view.plan.space.dimensions()))
    return {**plots, **progress_plots(view.records, size, generational, opt.name)}

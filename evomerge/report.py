"""The report of a run: summary, the held-out table (evolved vs baselines), plots.

`build_report(view)` returns the report.json dict (DESIGN.md contract: `heldout` and `search`
lists of rows `{name, kind, mean, tasks}`). Scoring the baselines is the expensive part; its
result is cached in RUN_DIR/report/report.json under a fingerprint of what determines it (the
trial's recipe, the models, the tasks and their settings), so `export` after `report` (or a
second `report`) scores nothing again.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge import __version__
from evomerge.errors import ConfigError, RunDirError
from evomerge.recipe import Recipe
from evomerge.runstore import RunStore, TrialRecord, atomic_write, best_trial

REPORT_FORMAT = 1
REPORT_DIR = "report"
KINDS = ("evolved", "parent", "uniform", "task_arithmetic", "ties", "greedy_soup", "ensemble")


@dataclass
class RunView:
    """A run directory opened for reporting: config, trials, and the chosen trial's recipe."""

    store: RunStore
    prepared: Any  # evomerge.study.Prepared
    records: list[TrialRecord]
    record: TrialRecord
    recipe: Recipe

    @property
    def config(self) -> Any:
        return self.prepared.config

    @property
    def sources(self) -> list[str]:
        return list(self.prepared.space.models)

    @property
    def objective_names(self) -> tuple[str, ...]:
        return tuple(self.prepared.objective.names)

    def searched_params(self) -> set[str]:
        """Parameter names the space searches (not fixed values): what the heatmaps show."""
        from evomerge.space import Range

        out = set()
        for ms in self.prepared.space.config.methods.values():
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
    from evomerge.study import load_run_config, prepare

    store = RunStore.open(run_dir)
    records = store.read_trials()
    record = select_trial(records, trial, store.dir)
    prepared = prepare(load_run_config(store))
    recipe = prepared.space.decode(record.genome)
    if recipe.content_hash() != record.recipe_hash:
        raise ConfigError(
            f"trial {record.trial} of {store.dir} now decodes to a different recipe than the one "
            f"it scored (hash {recipe.content_hash()} vs {record.recipe_hash}): the search space "
            "preset or a model path changed since the run; restore them to export this trial"
        )
    return RunView(store, prepared, records, record, recipe)


def fingerprint(view: RunView) -> str:
    """What the held-out table depends on; a cached table with another fingerprint is stale."""
    spec = view.prepared.worker_spec
    blob = {
        "format": REPORT_FORMAT,
        "recipe": view.recipe.content_hash(),
        "models": spec.models,
        "scoring": spec.scoring,
        "heldout": spec.heldout,
        "dtype": spec.dtype,
    }
    text = json.dumps(blob, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_cached(run_dir: Path, fp: str) -> dict[str, Any] | None:
    path = run_dir / REPORT_DIR / "report.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("fingerprint") != fp or not data.get("scored"):
        return None
    return data


def run_summary(view: RunView) -> dict[str, Any]:
    cfg = view.config
    recs = view.records
    space = view.prepared.space
    seconds = [r.seconds.get("total", 0.0) for r in recs if r.status != "duplicate"]
    return {
        "name": cfg.name,
        "run_dir": str(view.store.dir),
        "state": view.store.state().get("state"),
        "trials": len(recs),
        "budget": cfg.budget.max_trials,
        "ok": sum(1 for r in recs if r.status == "ok" and r.ok),
        "failed": sum(1 for r in recs if r.status == "failed"),
        "duplicates": sum(1 for r in recs if r.status == "duplicate"),
        "seconds_per_trial": round(statistics.fmean(seconds), 3) if seconds else None,
        "optimizer": {"name": cfg.optimizer.name, **cfg.optimizer.options},
        "seed": cfg.seed,
        "search_space": {
            "preset": cfg.search_space.get("preset"),
            "description": space.config.description.strip(),
            "methods": list(space.config.methods),
            "granularity": space.config.granularity,
            "genes": len(space.dimensions()),
        },
        "models": {
            "base": cfg.models.base,
            "sources": {s.name: s.path for s in cfg.models.sources},
        },
        "objectives": list(view.objective_names),
        "search_tasks": list(cfg.tasks.search),
        "heldout_tasks": list(cfg.tasks.heldout),
    }


def _search_key(view: RunView) -> Any:
    """Ranks search-split scores for the greedy soup: the study's fitness (the sum of the
    objectives when there are several; each is signed and weighted to be maximized)."""
    from evomerge.errors import CandidateError

    objective = view.prepared.objective

    def key(scores: Mapping[str, Mapping[str, float]]) -> float:
        try:
            return math.fsum(objective.evaluate(scores))
        except CandidateError:
            return float("-inf")

    return key


def build_report(
    view: RunView, *, heldout: bool = True, progress: bool = True, use_cache: bool = True
) -> dict[str, Any]:
    """report.json for the view's trial. With `heldout`, scores (or reuses) the baselines table."""
    fp = fingerprint(view)
    rec = view.record
    top = sorted(
        (r for r in view.records if r.status == "ok" and r.ok),
        key=lambda r: (-r.fitness[0], r.trial),
    )
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "evomerge_version": __version__,
        "created": time.time(),
        "run": run_summary(view),
        "trial": {
            "trial": rec.trial,
            "fitness": rec.fitness,
            "scores": rec.scores,
            "recipe_hash": rec.recipe_hash,
            "is_best": rec.trial == (best_trial(view.records) or rec).trial,
        },
        "top_trials": [
            {"trial": r.trial, "fitness": r.fitness, "scores": r.scores} for r in top[:5]
        ],
        "fingerprint": fp,
        "scored": False,
        "heldout": [],
        "search": [],
        "primary_metrics": {},
        "greedy_soup": [],
        "notes": [],
    }
    cached = read_cached(view.store.dir, fp) if use_cache else None
    if cached is not None:
        for key in (
            "scored",
            "heldout",
            "search",
            "primary_metrics",
            "greedy_soup",
            "notes",
            "seconds",
        ):
            if key in cached:
                report[key] = cached[key]
        report["cached"] = True
        return report
    if not heldout:
        report["notes"].append("held-out table not computed (run `evomerge report RUN_DIR`)")
        return report
    from evomerge.baselines import score_baselines

    t0 = time.perf_counter()
    tables = score_baselines(
        view.prepared.worker_spec,
        view.recipe,
        f"evolved (trial {rec.trial})",
        view.sources,
        _search_key(view),
        progress=progress,
    )
    notes = list(tables.notes)
    if not view.config.tasks.heldout:
        notes.append("the study names no held-out tasks (tasks.heldout): only the search table")
    report.update(
        scored=True,
        heldout=tables.heldout,
        search=tables.search,
        primary_metrics={
            sp: {t: {"metric": m, "higher_is_better": h} for t, (m, h) in by_task.items()}
            for sp, by_task in tables.primary.items()
        },
        greedy_soup=tables.greedy_soup,
        notes=notes,
        seconds=round(time.perf_counter() - t0, 2),
    )
    return report


def report_plots(view: RunView) -> dict[str, bytes]:
    """fitness.png, coefficients.png and (several objectives) pareto.png, as PNG bytes."""
    from evomerge.plots import run_plots

    return run_plots(
        view.records, view.objective_names, view.recipe, view.searched_params(), view.record.trial
    )


def report_json(report: Mapping[str, Any]) -> str:
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


def write_report_dir(view: RunView, report: Mapping[str, Any], plots: Mapping[str, bytes]) -> Path:
    """RUN_DIR/report/: report.json (also the cache of the held-out table) and the plots."""
    folder = view.store.dir / REPORT_DIR
    folder.mkdir(exist_ok=True)
    for name, data in plots.items():
        tmp = folder / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(folder / name)
    atomic_write(folder / "report.json", report_json(report))
    return folder


# ---------------------------------------------------------------------------- tables


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def table_cells(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, footnotes) of the side-by-side table: held-out columns, then search.

    '*' marks the best single model per column (the ensemble is a reference, not a merge).
    """
    splits = [sp for sp in ("heldout", "search") if report.get(sp)]
    header = ["model", "kind"]
    cols: list[tuple[str, str | None, bool]] = []  # split, task (None: mean), higher is better
    for sp in splits:
        label = "held-out" if sp == "heldout" else "search"
        primary = report.get("primary_metrics", {}).get(sp, {})
        for task in report[sp][0]["tasks"]:
            hib = primary.get(task, {}).get("higher_is_better", True)
            metric = primary.get(task, {}).get("metric")
            cols.append((sp, task, hib is not False))
            header.append(f"{label}: {task}" + (f" ({metric})" if metric else ""))
        if len(report[sp][0]["tasks"]) > 1:  # one task: its column is the mean
            cols.append((sp, None, True))
            header.append(f"{label}: mean")
    by_name = {sp: {r["name"]: r for r in report[sp]} for sp in splits}
    names = [r["name"] for r in report[splits[0]]] if splits else []
    best: dict[int, float] = {}
    for i, (sp, task, hib) in enumerate(cols):
        vals = [
            _value(by_name[sp][n], task)
            for n in names
            if by_name[sp][n]["kind"] != "ensemble" and _value(by_name[sp][n], task) is not None
        ]
        if len(set(vals)) > 1:  # a column where every model ties marks nothing
            best[i] = max(vals) if hib else min(vals)
    rows, notes = [], []
    for n in names:
        first = by_name[splits[0]][n]
        row = [n, first["kind"]]
        for i, (sp, task, _) in enumerate(cols):
            r = by_name[sp].get(n, {})
            v = _value(r, task) if r else None
            mark = "*" if v is not None and r.get("kind") != "ensemble" and v == best.get(i) else ""
            row.append(_fmt(v) + mark)
        rows.append(row)
        notes += [
            f"{n} failed on the {sp} tasks: {by_name[sp][n]['error']}"
            for sp in splits
            if by_name[sp].get(n, {}).get("error")
        ]
    return header, rows, notes


def _value(row: Mapping[str, Any], task: str | None) -> float | None:
    return row.get("mean") if task is None else row.get("tasks", {}).get(task)


CAPTION = (
    "search = the fitness tasks the merge was optimized on; held-out = tasks the search never "
    "saw (a gap between the two is overfitting to the fitness tasks). mean = mean of the tasks' "
    "primary metrics. * = best single model per column (the output ensemble is a reference at "
    "M x the inference cost)."
)


def format_heldout_table(report: Mapping[str, Any]) -> str:
    """The evolved model beside every baseline, held-out and search columns side by side."""
    if not report.get("search"):
        return "no held-out table: " + "; ".join(report.get("notes") or ["not computed"])
    import io

    from rich.console import Console
    from rich.table import Table

    header, rows, notes = table_cells(report)
    table = Table(title=f"held-out report: {report.get('run', {}).get('name', '')}")
    titles = [
        h.replace(": ", "\n", 1).replace(" (", "\n(", 1) for h in header
    ]  # split, task, metric
    for i, title in enumerate(titles):
        table.add_column(title, justify="left" if i < 2 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    widths = [
        max([*map(len, t.split("\n")), *(len(r[i]) for r in rows)]) for i, t in enumerate(titles)
    ]
    buf = io.StringIO()
    console = Console(
        file=buf,
        width=max(100, sum(w + 3 for w in widths) + 1),  # never truncate a cell
        color_system=None,
        force_terminal=False,
        force_jupyter=False,  # text, also inside a notebook
    )
    console.print(table)
    console.print(CAPTION)
    for note in [*notes, *report.get("notes", [])]:
        console.print(f"note: {note}")
    return buf.getvalue().rstrip() + "\n"


def markdown_heldout_table(report: Mapping[str, Any]) -> str:
    if not report.get("search"):
        return "_Not computed: " + "; ".join(report.get("notes") or ["no held-out report"]) + "._\n"
    header, rows, notes = table_cells(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", CAPTION]
    lines += [f"\nNote: {n}" for n in [*notes, *report.get("notes", [])]]
    return "\n".join(lines) + "\n"


def format_summary(report: Mapping[str, Any]) -> str:
    """A few lines on the run and the chosen trial, then its top trials."""
    run, tr = report["run"], report["trial"]
    sp = run["search_space"]
    opts = {k: v for k, v in run["optimizer"].items() if k != "name"}
    lines = [
        f"run {run['name']} ({run['state']}): {run['trials']}/{run['budget']} trials, "
        f"{run['failed']} failed, {run['duplicates']} duplicates, "
        f"{run['seconds_per_trial']} s per trial",
        f"optimizer {run['optimizer']['name']}"
        + (f" {json.dumps(opts, sort_keys=True)}" if opts else "")
        + f"; search space {sp['preset'] or 'inline'}: methods {', '.join(sp['methods'])}, "
        f"{sp['genes']} genes, {sp['granularity']} layer(s) per group",
        f"trial {tr['trial']}{' (best)' if tr['is_best'] else ''}: "
        + ", ".join(f"{n} {v:.4f}" for n, v in zip(run["objectives"], tr["fitness"], strict=False))
        + "; "
        + ", ".join(f"{t} {k} {v:.4f}" for t, m in tr["scores"].items() for k, v in m.items()),
        "top trials: "
        + ", ".join(
            f"#{t['trial']} {' / '.join(f'{v:.4f}' for v in t['fitness'])}"
            for t in report["top_trials"]
        ),
    ]
    return "\n".join(lines) + "\n"

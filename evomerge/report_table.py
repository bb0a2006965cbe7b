"""The report as text: the held-out table (rich for a terminal, markdown for the model card) and
a few summary lines. Pure formatting of a `Report`; nothing is scored or read here."""

from __future__ import annotations

import io
import json

from evomerge.report_model import Report, ReportRow, Split

CAPTION = (
    "search = the fitness tasks the merge was optimized on; held-out = tasks the search never "
    "saw (a gap between the two is overfitting to the fitness tasks). mean = mean of the tasks' "
    "primary metrics. * = best single model per column (the output ensemble is a reference at "
    "M x the inference cost)."
)

SIGNIFICANT = "†"  # the interval of a difference excludes 0


def comparison_caption(report: Report) -> str:
    """What the `vs evolved` column means; empty when the report has none."""
    cmp = report.comparison
    if cmp is None or _compared_split(report) is None:
        return ""  # an earlier report, or no row with an interval
    return (
        f" vs evolved = the row's mean minus the evolved model's, on the same items, with its "
        f"{cmp.confidence:.0%} confidence interval (paired bootstrap, {cmp.resamples} resamples "
        f"of the items within each task); {SIGNIFICANT} = the interval excludes 0 (a "
        "significant difference)."
    )


def search_fitness_line(report: Report) -> str | None:
    """The winner's recorded search fitness beside its re-measurement on every search item."""
    fit = report.search_fitness
    if fit is None:
        return None

    def values(v: tuple[float, ...]) -> str:
        return " / ".join(f"{x:.4f}" for x in v)

    chosen = f"{'the' if report.trial.is_best else 'not the'} best of {fit.trials} trials"
    subset = ", racing: it may rest on a subset of the items" if fit.fidelity == "racing" else ""
    again = (
        "failed when re-measured"
        if fit.remeasured is None
        else f"re-measured {values(fit.remeasured)} on every search item"
    )
    return (
        f"search fitness: recorded {values(fit.recorded)} (trial {fit.trial}, {chosen}{subset}), "
        f"{again} (the best of many noisy scores is biased upward; held-out is not)"
    )


def _compared_split(report: Report) -> Split | None:
    """The split whose `vs evolved` column the table shows: the first shown (held-out when
    there is one), if its rows have intervals."""
    splits = [sp for sp in ("heldout", "search") if report.rows(sp)]
    if report.comparison and splits and any(r.vs_evolved for r in report.rows(splits[0])):
        return splits[0]
    return None


def _vs_cell(row: ReportRow | None) -> str:
    """'ref' for the evolved row itself, '-' where there is no interval."""
    if row is not None and row.kind == "evolved":
        return "ref"
    vs = None if row is None else row.vs_evolved
    if vs is None:
        return "-"
    low, high = vs.ci
    return f"{vs.diff:+.3f} [{low:+.3f}, {high:+.3f}]" + (SIGNIFICANT if vs.significant else "")


Column = tuple[Split, str | None, bool]  # split, task (None: the mean), higher is better


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _columns(report: Report, splits: list[Split]) -> tuple[list[str], list[Column]]:
    """Header and columns: per split its tasks (with the primary metric), then the mean."""
    header = ["model", "kind"]
    cols: list[Column] = []
    for sp in splits:
        label = "held-out" if sp == "heldout" else "search"
        primary = report.primary_metrics.get(sp, {})
        tasks = list(report.rows(sp)[0].tasks)
        for task in tasks:
            pm = primary.get(task)
            cols.append((sp, task, pm is None or pm.higher_is_better))
            header.append(f"{label}: {task}" + (f" ({pm.metric})" if pm else ""))
        if len(tasks) > 1:  # one task: its column is the mean
            cols.append((sp, None, True))
            header.append(f"{label}: mean")
    return header, cols


def _best(
    cols: list[Column], names: list[str], by_name: dict[str, dict[str, ReportRow]]
) -> dict[int, float]:
    """Column index -> the best single model's value (the ensemble is a reference, not a merge)."""
    best: dict[int, float] = {}
    for i, (sp, task, hib) in enumerate(cols):
        rows = [by_name[sp][n] for n in names if n in by_name[sp]]
        vals = [v for r in rows if r.kind != "ensemble" and (v := r.value(task)) is not None]
        if len(set(vals)) > 1:  # a column where every model ties marks nothing
            best[i] = max(vals) if hib else min(vals)
    return best


def table_cells(report: Report) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, rows, footnotes) of the side-by-side table: held-out columns, then search.

    '*' marks the best single model per column (the ensemble is a reference, not a merge);
    a `vs evolved` column follows the first split's columns when its rows have intervals.
    """
    splits: list[Split] = [sp for sp in ("heldout", "search") if report.rows(sp)]
    header, cols = _columns(report, splits)
    by_name = {sp: {r.name: r for r in report.rows(sp)} for sp in splits}
    names = [r.name for r in report.rows(splits[0])] if splits else []
    best = _best(cols, names, by_name)
    vs_split = _compared_split(report)
    vs_at = 2 + sum(1 for sp, _, _ in cols if sp == vs_split)  # after that split's columns
    if vs_split is not None and report.comparison is not None:
        label = "held-out" if vs_split == "heldout" else "search"
        header.insert(vs_at, f"{label}: vs evolved ({report.comparison.confidence:.0%} CI)")
    rows, notes = [], []
    for n in names:
        row = [n, by_name[splits[0]][n].kind]
        for i, (sp, task, _) in enumerate(cols):
            r = by_name[sp].get(n)
            v = r.value(task) if r else None
            mark = "*" if r and v is not None and r.kind != "ensemble" and v == best.get(i) else ""
            row.append(_fmt(v) + mark)
        if vs_split is not None:
            row.insert(vs_at, _vs_cell(by_name[vs_split].get(n)))
        rows.append(row)
        notes += [
            f"{n} failed on the {sp} tasks: {r.error}"
            for sp in splits
            if (r := by_name[sp].get(n)) and r.error
        ]
    return header, rows, notes


def _comparison_notes(report: Report) -> tuple[str, ...]:
    return () if report.comparison is None else report.comparison.notes


def format_heldout_table(report: Report) -> str:
    """The evolved model beside every baseline, held-out and search columns side by side."""
    if not report.search:
        return "no held-out table: " + "; ".join(report.notes or ["not computed"])
    from rich.console import Console
    from rich.table import Table

    header, rows, notes = table_cells(report)
    table = Table(title=f"held-out report: {report.run.name}")
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
    console.print(CAPTION + comparison_caption(report))
    if (line := search_fitness_line(report)) is not None:
        console.print(line)
    for note in [*notes, *report.notes, *_comparison_notes(report)]:
        console.print(f"note: {note}")
    return buf.getvalue().rstrip() + "\n"


def markdown_heldout_table(report: Report) -> str:
    """The same table in markdown, for the model card."""
    if not report.search:
        return "_Not computed: " + "; ".join(report.notes or ["no held-out report"]) + "._\n"
    header, rows, notes = table_cells(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", CAPTION + comparison_caption(report)]
    if (line := search_fitness_line(report)) is not None:
        lines += ["", line]
    lines += [f"\nNote: {n}" for n in [*notes, *report.notes, *_comparison_notes(report)]]
    return "\n".join(lines) + "\n"


def format_summary(report: Report) -> str:
    """A few lines on the run and the chosen trial, then its top trials."""
    run, tr = report.run, report.trial
    sp = run.search_space
    opts = run.optimizer.options
    lines = [
        f"run {run.name} ({run.state}): {run.trials}/{run.budget} trials, "
        f"{run.failed} failed, {run.duplicates} duplicates, "
        f"{run.seconds_per_trial} s per trial",
        f"optimizer {run.optimizer.name}"
        + (f" {json.dumps(opts, sort_keys=True)}" if opts else "")
        + f"; search space {sp.preset or 'inline'}: methods {', '.join(sp.methods)}, "
        f"{sp.genes} genes, {sp.granularity} layer(s) per group",
        f"trial {tr.trial}{' (best)' if tr.is_best else ''}: "
        + ", ".join(f"{n} {v:.4f}" for n, v in zip(run.objectives, tr.fitness, strict=False))
        + "; "
        + ", ".join(f"{t} {k} {v:.4f}" for t, m in tr.scores.items() for k, v in m.items()),
        "top trials: "
        + ", ".join(
            f"#{t.trial} {' / '.join(f'{v:.4f}' for v in t.fitness)}" for t in report.top_trials
        ),
    ]
    return "\n".join(lines) + "\n"

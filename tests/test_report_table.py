"""The report as text: the held-out table (terminal and markdown) and the summary lines.

tests/data/report/scored.md and scored.txt are what evomerge wrote for scored.json before the
report was typed (see tests/test_report_model.py): a report without comparisons still prints
them unchanged. compared.md and compared.txt are the tables of compared.json, written when the
`vs evolved` column and the search-fitness line were added (regenerated deliberately)."""

from __future__ import annotations

import pytest

from evomerge.report_model import PrimaryMetric, Report, ReportRow, VsEvolved
from evomerge.report_table import (
    format_heldout_table,
    format_summary,
    markdown_heldout_table,
    search_fitness_line,
    table_cells,
)
from tests.report_factory import DATA


def golden(name: str = "scored.json") -> Report:
    return Report.from_json((DATA / name).read_text())


@pytest.mark.parametrize("name", ["scored", "compared"])
def test_golden_tables(name):
    report = golden(f"{name}.json")
    assert markdown_heldout_table(report) == (DATA / f"{name}.md").read_text()
    text = format_summary(report) + format_heldout_table(report)
    assert text == (DATA / f"{name}.txt").read_text()


def test_vs_evolved_column_follows_the_heldout_columns():
    report = golden("compared.json")
    header, rows, _ = table_cells(report)
    assert header[2:5] == ["held-out: tiny_heldout (acc)", "held-out: vs evolved (95% CI)",
                           "search: tiny_search (acc)"]  # fmt: skip
    cells = {r[0]: r[3] for r in rows}
    assert cells["evolved (trial 0)"] == "ref"
    assert cells["parent s1"] == "+0.167 [+0.000, +0.417]"  # 0 inside: no mark
    assert "vs evolved (95% CI)" not in table_cells(golden())[0]  # an earlier report: no column
    sig = VsEvolved(diff=-0.2, ci=(-0.31, -0.05), significant=True)
    held = list(report.heldout)
    held[1] = held[1].model_copy(update={"vs_evolved": sig})
    held[2] = held[2].model_copy(update={"vs_evolved": None, "error": "NaN", "mean": None})
    marked = report.model_copy(update={"heldout": tuple(held)})
    _, rows, _ = table_cells(marked)
    assert [r[3] for r in rows[1:3]] == ["-0.200 [-0.310, -0.050]†", "-"]
    noted = marked.model_copy(
        update={"comparison": report.comparison.model_copy(update={"notes": ("why not",)})}
    )
    for text in (format_heldout_table(noted), markdown_heldout_table(noted)):
        assert "-0.200 [-0.310, -0.050]†" in text and "† = the interval excludes 0" in text
        assert "ote: why not" in text
        assert "95% confidence interval (paired bootstrap, 2000 resamples" in text


def test_no_heldout_split_puts_the_column_after_the_search_columns():
    report = golden("compared.json").model_copy(update={"heldout": ()})
    header, rows, _ = table_cells(report)
    assert header[-1] == "search: vs evolved (95% CI)" and rows[0][-1] == "ref"


def test_search_fitness_line_shows_recorded_and_remeasured():
    report = golden("compared.json")
    assert search_fitness_line(report) == (
        "search fitness: recorded 0.5000 / 0.4167 (trial 0, the best of 6 trials), re-measured "
        "0.5000 / 0.4167 on every search item (the best of many noisy scores is biased upward; "
        "held-out is not)"
    )
    fit = report.search_fitness.model_copy(
        update={"fidelity": "racing", "recorded": (0.701,), "remeasured": (0.688,), "trials": 240}
    )
    raced = report.model_copy(update={"search_fitness": fit})
    assert search_fitness_line(raced).startswith(
        "search fitness: recorded 0.7010 (trial 0, the best of 240 trials, racing: it may rest on a "
        "subset of the items), re-measured 0.6880 on every search item"
    )
    failed = raced.model_copy(
        update={"search_fitness": fit.model_copy(update={"remeasured": None})}
    )
    assert "), failed when re-measured (" in search_fitness_line(failed)
    assert search_fitness_line(golden()) is None  # an earlier report has none
    assert "search fitness:" in format_heldout_table(raced)


def test_table_marks_best_merge_and_reports_failures():
    def row(name, kind, v, err=None):
        return ReportRow(name=name, kind=kind, mean=v, tasks={"t": v}, error=err)

    report = golden().model_copy(
        update={
            "primary_metrics": {"search": {"t": PrimaryMetric(metric="acc", higher_is_better=True)}},
            "search": (row("evolved", "evolved", 0.6), row("p", "parent", 0.5),
                       row("bad", "ties", None, "the model produced NaN"), row("ens", "ensemble", 0.9)),
            "heldout": (),
            "notes": (),
        }
    )  # fmt: skip
    header, rows, notes = table_cells(report)
    assert header == ["model", "kind", "search: t (acc)"]
    assert [r[2] for r in rows] == ["0.600*", "0.500", "-", "0.900"]
    assert notes == ["bad failed on the search tasks: the model produced NaN"]
    assert "bad failed on the search tasks" in format_heldout_table(report)
    tie = report.model_copy(update={"search": (row("a", "evolved", 0.0), row("b", "parent", 0.0))})
    assert [r[2] for r in table_cells(tie)[1]] == ["0.000", "0.000"]  # all tie: no mark


def test_lower_is_better_marks_the_minimum_and_means_get_a_column():
    report = golden()
    lower = {t: pm.model_copy(update={"higher_is_better": False})
             for t, pm in report.primary_metrics["search"].items()}  # fmt: skip
    header, rows, _ = table_cells(report.model_copy(update={"primary_metrics": {"search": lower}}))
    col = header.index("search: tiny_search (acc)")
    assert "held-out: tiny_heldout" in header  # its metric is unknown here: no suffix
    assert header[-1] == "search: mean"
    marked = [r[0] for r in rows if r[col].endswith("*")]
    values = {r.name: r.tasks["tiny_search"] for r in report.search if r.kind != "ensemble"}
    assert marked == [n for n, v in values.items() if v == min(values.values())]


def test_an_unscored_report_says_why_there_is_no_table():
    report = golden("unscored.json")
    why = "held-out table not computed (run `evomerge report RUN_DIR`)"
    assert format_heldout_table(report) == f"no held-out table: {why}"
    assert markdown_heldout_table(report) == f"_Not computed: {why}._\n"
    assert table_cells(report) == (["model", "kind"], [], [])
    assert format_summary(report).startswith("run tiny (finished): 5/5 trials, 0 failed")


def test_search_fitness_line_of_a_trial_that_is_not_the_best():
    report = golden("compared.json")
    other = report.model_copy(update={"trial": report.trial.model_copy(update={"is_best": False})})
    assert "(trial 0, not the best of 6 trials)" in search_fitness_line(other)

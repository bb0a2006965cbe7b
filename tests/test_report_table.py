"""The report as text: the held-out table (terminal and markdown) and the summary lines.

tests/data/report/scored.md and scored.txt are what evomerge wrote for scored.json before the
report was typed (see tests/test_report_model.py)."""

from __future__ import annotations

from evomerge.report_model import PrimaryMetric, Report, ReportRow
from evomerge.report_table import (
    format_heldout_table,
    format_summary,
    markdown_heldout_table,
    table_cells,
)
from tests.report_factory import DATA


def golden(name: str = "scored.json") -> Report:
    return Report.from_json((DATA / name).read_text())


def test_tables_and_summary_of_a_report_are_unchanged():
    report = golden()
    assert markdown_heldout_table(report) == (DATA / "scored.md").read_text()
    assert (
        format_summary(report) + format_heldout_table(report) == (DATA / "scored.txt").read_text()
    )


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

"""Rows against the evolved row on the same items: which rows get an interval, on which items,
and why the others get none."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.bootstrap import paired_bootstrap
from evomerge.items import ItemScores
from evomerge.report_compare import compare_split, compare_tables, primary_items
from evomerge.report_model import ReportRow, VsEvolved

PRIMARY = {"a": "acc", "b": "exact_match"}
EVOLVED = {"a": [1, 1, 0, 1, 0, 1], "b": [0, 1, 1, 1]}


def items(values: dict[str, list[float]], ids: dict[str, list[int]] | None = None) -> ItemScores:
    ids = ids or {t: list(range(len(v))) for t, v in values.items()}
    return ItemScores.from_lists(ids, {t: {PRIMARY[t]: v} for t, v in values.items()})


def row(name: str, kind: str, values: dict[str, list[float]] | None, error=None) -> ReportRow:
    tasks = {t: None if values is None else float(np.mean(values[t])) for t in PRIMARY}
    mean = None if values is None else float(np.mean(list(tasks.values())))
    return ReportRow(name=name, kind=kind, mean=mean, tasks=tasks, error=error)


def test_rows_get_the_bootstrap_of_their_differences_on_the_evolved_items():
    better = {"a": [1, 1, 1, 1, 1, 1], "b": [1, 1, 1, 1]}
    same = EVOLVED
    rows = [row("evolved", "evolved", EVOLVED), row("p", "parent", better),
            row("u", "uniform", same)]  # fmt: skip
    its = [items(EVOLVED), items(better), items(same)]
    out, n, notes = compare_split("heldout", rows, its, PRIMARY)
    assert n == 10 and notes == []
    assert out[0].vs_evolved is None  # the reference itself
    diffs = {
        t: np.array([better[t], same[t]], float) - np.array(EVOLVED[t], float) for t in PRIMARY
    }
    want = paired_bootstrap(diffs)
    for got, iv in zip(out[1:], want, strict=True):
        assert got.vs_evolved == VsEvolved(diff=iv.diff, ci=(iv.low, iv.high),
                                           significant=iv.significant)  # fmt: skip
    assert out[1].vs_evolved.diff == pytest.approx(out[1].mean - out[0].mean)
    assert out[1].vs_evolved.ci[0] == 0.0  # never worse: no resample below 0
    assert out[2].vs_evolved == VsEvolved(diff=0.0, ci=(0.0, 0.0), significant=False)


def test_items_are_paired_by_document_not_by_position():
    """A row that lists its items in another order is compared item by item; one scored on
    other items too is not (its table value is not about the evolved model's items)."""
    ref = items({"a": [1, 0, 1], "b": [0, 1]}, {"a": [2, 4, 6], "b": [0, 1]})
    other = items({"a": [1, 0, 1], "b": [0, 1]}, {"a": [6, 2, 4], "b": [1, 0]})
    tasks = {"a": 2 / 3, "b": 0.5}
    evolved = ReportRow(name="e", kind="evolved", mean=7 / 12, tasks=tasks)
    r = ReportRow(name="r", kind="ties", mean=7 / 12, tasks=tasks)
    (_, got), n, _ = compare_split("search", [evolved, r], [ref, other], PRIMARY)
    # on the documents a = [2, 4, 6], b = [0, 1] the row has a [0, 1, 1] and b [1, 0]
    want = paired_bootstrap({"a": np.array([[-1.0, 1.0, 0.0]]), "b": np.array([[1.0, -1.0]])})[0]
    assert n == 5 and got.vs_evolved.ci == (want.low, want.high) and got.vs_evolved.diff == 0
    more = items({"a": [1, 0, 1, 0], "b": [0, 1]}, {"a": [6, 2, 4, 9], "b": [1, 0]})
    wide = r.model_copy(update={"tasks": {"a": 0.5, "b": 0.5}, "mean": 0.5})
    (_, got), _, notes = compare_split("search", [evolved, wide], [ref, more], PRIMARY)
    assert got.vs_evolved is None and notes == [
        "r: no interval (its search items are not the evolved model's)"
    ]


def test_rows_that_cannot_be_compared_get_a_note_not_an_interval():
    partial = items({"a": [1, 1], "b": [1, 1, 1, 1]})  # scored on 2 of the 6 items of a
    rows = [row("evolved", "evolved", EVOLVED), row("bad", "ties", None, "NaN"),
            row("part", "parent", {"a": [1, 1], "b": [1, 1, 1, 1]}),
            row("ens", "ensemble", EVOLVED)]  # fmt: skip
    out, n, notes = compare_split("heldout", rows, [items(EVOLVED), None, partial, None], PRIMARY)
    assert [r.vs_evolved for r in out] == [None] * 4 and n == 10
    assert notes == [
        "part: no interval (its held-out items are not the evolved model's)",
        "ens: no interval (its held-out items are not the evolved model's)",
    ]


def test_a_metric_that_is_no_mean_of_its_items_gets_no_interval():
    """BLEU-like: the table's value is not the mean of the per-item values (or a group has no
    items): no interval for the split, and the note says why."""
    rows = [row("evolved", "evolved", EVOLVED), row("p", "parent", EVOLVED)]
    corpus = rows[0].model_copy(update={"tasks": {"a": 0.9, "b": 0.75}})
    out, n, notes = compare_split("heldout", [corpus, rows[1]], [items(EVOLVED)] * 2, PRIMARY)
    assert n == 0 and out[1].vs_evolved is None
    assert notes == ["no held-out confidence intervals: a has no per-item acc that averages to its "
                     "score (a group, or a metric lm-eval does not aggregate as a mean of items)"]  # fmt: skip
    failed = rows[0].model_copy(update={"error": "NaN"})
    _, _, notes = compare_split("search", [failed, rows[1]], [None, items(EVOLVED)], PRIMARY)
    assert notes == ["no search confidence intervals: the evolved model has no scores"]


def test_compare_tables_replaces_earlier_intervals_and_counts_items():
    stale = VsEvolved(diff=9.0, ci=(8.0, 10.0), significant=True)
    rows = [row("evolved", "evolved", EVOLVED), row("p", "parent", EVOLVED)]
    rows[1] = rows[1].model_copy(update={"vs_evolved": stale})
    out, cmp = compare_tables({"search": rows, "heldout": ()}, {"search": [items(EVOLVED)] * 2},
                              {"search": PRIMARY, "heldout": {}})  # fmt: skip
    assert out["search"][1].vs_evolved.diff == 0.0 and out["heldout"] == ()
    assert cmp.items == {"search": 10} and cmp.resamples == 2000 and cmp.confidence == 0.95
    out, cmp = compare_tables({"search": rows}, {}, {"search": PRIMARY})  # no items at all
    assert out["search"][1].vs_evolved is None and cmp.items == {}


def test_primary_items_keeps_only_the_primary_metric_of_the_table_tasks():
    full = ItemScores.from_lists(
        {"a": [0, 1], "z": [0]}, {"a": {"acc": [1, 0], "acc_norm": [1, 1]}, "z": {"acc": [1]}}
    )
    kept = primary_items(full, PRIMARY)
    assert list(kept.ids) == ["a"] and list(kept.values["a"]) == ["acc"]
    assert primary_items(None, PRIMARY) is None

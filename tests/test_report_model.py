"""The typed report: report.json round-trips through it byte for byte.

tests/data/report/*.json were written by evomerge before the report was typed (commit 9429a36,
the dict-building `build_report` and `report_json`): `scored.json` from `evomerge report` on the
tiny method-choice study, read back from the cache (so it has `seconds` and `cached`), with the
held-out TIES row replaced by the row `make_row` wrote for a failed candidate (no `metrics`, an
`error`, a null mean); `unscored.json` from `export --no-report` on a study with no base model
and no held-out tasks (no `seconds`, no `cached`). Both predate the item-level comparisons and
must still read and write unchanged.

`compared.json` is what `evomerge report` wrote (read back from its cache) on the tiny
method-choice study once rows had `vs_evolved` and the report `comparison` and `search_fitness`
(paths moved under /data/example, `created` fixed): regenerated deliberately when those fields
were added; every key and value that `scored.json` has kept its meaning.
"""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from evomerge.report_model import KINDS, OptimizerSummary, Report, ReportRow, VsEvolved
from tests.report_factory import DATA


@pytest.mark.parametrize("name", ["scored.json", "unscored.json", "compared.json"])
def test_report_json_round_trips_byte_for_byte(name):
    text = (DATA / name).read_text()
    report = Report.from_json(text)
    assert report.to_json() == text
    assert Report.from_json(report.to_json()) == report


def test_the_golden_files_cover_every_optional_key():
    scored = Report.from_json((DATA / "scored.json").read_text())
    unscored = Report.from_json((DATA / "unscored.json").read_text())
    assert scored.scored and scored.cached and scored.seconds is not None
    assert not unscored.scored and not unscored.cached and unscored.seconds is None
    failed = [r for r in scored.heldout if r.error]
    assert len(failed) == 1 and failed[0].metrics is None and failed[0].mean is None
    assert {r.kind for r in scored.search} == set(KINDS)


def test_unset_optional_keys_are_left_out_not_null():
    row = ReportRow(name="p", kind="parent", mean=0.5, tasks={"t": 0.5})
    assert list(row.model_dump()) == ["name", "kind", "mean", "tasks"]
    failed = row.model_copy(update={"mean": None, "tasks": {"t": None}, "error": "NaN"})
    assert failed.model_dump() == {"name": "p", "kind": "parent", "mean": None,
                                   "tasks": {"t": None}, "error": "NaN"}  # fmt: skip
    unscored = json.loads((DATA / "unscored.json").read_text())
    assert "seconds" not in unscored and "cached" not in unscored
    keys = list(json.loads((DATA / "scored.json").read_text()))
    assert keys[-3:] == ["notes", "seconds", "cached"]


def test_kind_and_fields_are_checked():
    with pytest.raises(ValidationError, match="kind"):
        ReportRow(name="x", kind="soup", mean=None, tasks={})
    with pytest.raises(ValidationError, match="extra"):
        ReportRow(name="x", kind="ties", mean=None, tasks={}, note="?")
    row = ReportRow(name="x", kind="ties", mean=None, tasks={})
    with pytest.raises(ValidationError, match="frozen"):
        row.mean = 1.0


def test_nan_is_refused_when_written():
    """report.json is JSON: a NaN must fail loudly, not be written as NaN or silently as null."""
    report = Report.from_json((DATA / "scored.json").read_text())
    row = report.search[0].model_copy(update={"mean": math.nan})
    with pytest.raises(ValueError, match="JSON compliant"):
        report.model_copy(update={"search": (row, *report.search[1:])}).to_json()


def test_optimizer_options_stay_flat_beside_the_name():
    opt = OptimizerSummary(name="cma", popsize=4, sigma0=0.3)
    assert opt.model_dump() == {"name": "cma", "popsize": 4, "sigma0": 0.3}
    assert opt.options == {"popsize": 4, "sigma0": 0.3}
    assert OptimizerSummary(name="optuna_tpe").options == {}


def test_row_value_reads_a_task_or_the_mean():
    row = ReportRow(name="e", kind="evolved", mean=0.4, tasks={"a": 0.3, "b": 0.5})
    assert row.value("a") == 0.3 and row.value(None) == 0.4 and row.value("c") is None


def test_comparisons_are_new_optional_keys_after_the_old_ones():
    text = (DATA / "compared.json").read_text()
    data, report = json.loads(text), Report.from_json(text)
    assert list(data)[-5:] == ["comparison", "search_fitness", "notes", "seconds", "cached"]
    assert report.comparison.items == {"search": 24, "heldout": 12}
    assert report.search_fitness.recorded == report.trial.fitness
    for split in ("search", "heldout"):
        evolved, *others = data[split]
        assert "vs_evolved" not in evolved
        for row in others:
            assert list(row) == ["name", "kind", "mean", "tasks", "metrics", "vs_evolved"]
            assert set(row["vs_evolved"]) == {"diff", "ci", "significant"}
            assert math.isclose(row["vs_evolved"]["diff"], row["mean"] - evolved["mean"])
    with pytest.raises(ValidationError, match="ci"):
        VsEvolved(diff=0.1, ci=(0.0,), significant=True)

"""RUN_DIR/report/: writing the report and plots, and reading report.json back as the cache of
the held-out table under the fingerprint of what the table depends on."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from evomerge.items import ItemScores
from evomerge.recipe import Recipe, Section
from evomerge.report_cache import (
    ITEMS,
    REPORT_DIR,
    fingerprint,
    read_cached,
    read_items,
    write_items,
    write_report_dir,
)
from evomerge.report_model import Report
from evomerge.scoring.config import ScoringSettings
from tests.report_factory import DATA

RECIPE = Recipe(
    models={"base": "/m/base", "a": "/m/a", "b": "/m/b"},
    base_model="base",
    sections=[Section(method="ties", models={"a": {"weight": 0.4}, "b": {"weight": 0.6}})],
)
SEARCH = ScoringSettings(tasks=("t1",), include_paths=("/tasks",), batch_size=8)
HELDOUT = ScoringSettings(tasks=("t2",), include_paths=("/tasks",), batch_size=8)


def golden(name: str = "scored.json") -> Report:
    return Report.from_json((DATA / name).read_text())


def test_fingerprint_is_report_format_1s():
    """The hash earlier versions wrote, so a table they cached is still reused."""
    fields = {"tasks": ["t1"], "include_paths": ["/tasks"], "limit": None, "num_fewshot": None,
              "batch_size": 8, "apply_chat_template": False, "fewshot_seed": 1234}  # fmt: skip
    blob = {"format": 1, "recipe": RECIPE.content_hash(), "models": RECIPE.models,
            "scoring": fields, "heldout": None, "dtype": "float32"}  # fmt: skip
    text = json.dumps(blob, sort_keys=True)
    assert (
        fingerprint(RECIPE, SEARCH, None, "float32")
        == hashlib.sha256(text.encode()).hexdigest()[:16]
    )


def test_fingerprint_follows_what_the_table_depends_on():
    fp = fingerprint(RECIPE, SEARCH, HELDOUT, "float32")
    assert fingerprint(RECIPE, SEARCH, HELDOUT, "float32") == fp
    other = RECIPE.model_copy(update={"models": {**RECIPE.models, "b": "/m/c"}})
    changed = [
        fingerprint(other, SEARCH, HELDOUT, "float32"),
        fingerprint(RECIPE, SEARCH, None, "float32"),
        fingerprint(RECIPE, SEARCH, HELDOUT.model_copy(update={"limit": 4}), "float32"),
        fingerprint(RECIPE, SEARCH.model_copy(update={"num_fewshot": 2}), HELDOUT, "float32"),
        fingerprint(RECIPE, SEARCH, HELDOUT, "bfloat16"),
    ]
    assert fp not in changed and len(set(changed)) == len(changed)


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / REPORT_DIR).mkdir()
    return tmp_path


def test_read_cached_gives_the_scored_report_of_its_fingerprint(run_dir):
    report = golden()
    (run_dir / REPORT_DIR / "report.json").write_text(report.to_json())
    assert read_cached(run_dir, report.fingerprint) == report
    assert read_cached(run_dir, "0" * 16) is None  # stale


@pytest.mark.parametrize(
    "text",
    [
        None,  # no file
        "{not json",
        json.dumps({"fingerprint": "b371f4e91d01d2ea", "scored": True}),  # not a whole report
        (DATA / "scored.json").read_text().replace('"kind": "ties"', '"kind": "soup"'),
    ],
)
def test_read_cached_ignores_what_it_cannot_use(run_dir, text):
    if text is not None:
        (run_dir / REPORT_DIR / "report.json").write_text(text)
    assert read_cached(run_dir, golden().fingerprint) is None


def test_an_unscored_report_is_no_cache(run_dir):
    report = golden("unscored.json")
    (run_dir / REPORT_DIR / "report.json").write_text(report.to_json())
    assert read_cached(run_dir, report.fingerprint) is None


def test_write_report_dir_writes_the_report_and_plots(tmp_path):
    report = golden()
    folder = write_report_dir(tmp_path, report, {"fitness.png": b"png-1", "pareto.png": b"png-2"})
    assert folder == tmp_path / REPORT_DIR
    assert (folder / "report.json").read_text() == report.to_json()
    assert (folder / "fitness.png").read_bytes() == b"png-1"
    assert sorted(p.name for p in folder.iterdir()) == ["fitness.png", "pareto.png", "report.json"]
    write_report_dir(tmp_path, golden("unscored.json"), {})  # replaces the report, keeps plots
    assert Report.from_json((folder / "report.json").read_text()) == golden("unscored.json")
    assert (folder / "pareto.png").exists()


def _row_items(report: Report, split: str, seed: int) -> ItemScores:
    rng = np.random.default_rng(seed)
    ids = {t: rng.permutation(12)[:9] for t in report.primary_metrics[split]}
    values = {t: {pm.metric: rng.integers(0, 2, 9).astype(float)}
              for t, pm in report.primary_metrics[split].items()}  # fmt: skip
    return ItemScores(ids, values)


def _same(a: ItemScores | None, b: ItemScores | None) -> bool:
    if a is None or b is None:
        return a is b
    order = {t: np.argsort(i) for t, i in a.ids.items()}
    return a.ids.keys() == b.ids.keys() and all(
        np.array_equal(a.ids[t][order[t]], b.ids[t])
        and all(np.array_equal(v[order[t]], b.values[t][m]) for m, v in a.values[t].items())
        for t in a.ids
    )


def test_items_round_trip_for_their_table_only(tmp_path):
    report = golden("compared.json")
    items = {
        sp: tuple(
            None if i == 2 else _row_items(report, sp, i) for i in range(len(report.rows(sp)))
        )
        for sp in ("search", "heldout")
    }
    path = write_items(tmp_path, report, items)
    assert path == tmp_path / REPORT_DIR / ITEMS and path.stat().st_size < 8000
    back = read_items(tmp_path, report)
    for sp in items:
        assert len(back[sp]) == len(items[sp])
        assert all(_same(a, b) for a, b in zip(items[sp], back[sp], strict=True))
    other = report.model_copy(update={"fingerprint": "0" * 16})
    assert read_items(tmp_path, other) is None  # another table's items
    renamed = report.model_copy(update={"search": (report.search[1], report.search[0],
                                                   *report.search[2:])})  # fmt: skip
    assert read_items(tmp_path, renamed) is None  # rows of another order
    path.write_bytes(path.read_bytes()[:100])  # torn
    assert read_items(tmp_path, report) is None
    path.unlink()
    assert read_items(tmp_path, report) is None

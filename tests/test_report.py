"""`evomerge report` and evomerge.report: opening a run, building its typed report (scored, from
the cache, or without the table), its intervals against the evolved row and the re-measured
search fitness, the plots it writes, and the notebook, on a multi-objective study whose recipes
mix methods."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest

from evomerge.bootstrap import paired_bootstrap
from evomerge.errors import ConfigError, RunDirError
from evomerge.report import NOT_COMPUTED, build_report, open_run, select_trial
from evomerge.report_cache import ITEMS
from evomerge.report_model import Report
from evomerge.runstore import RunStore, TrialRecord, best_trial
from tests.report_factory import cli, method_choice_run

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return method_choice_run(tmp_path_factory.mktemp("rep"))


@pytest.fixture(scope="module")
def reported(run_dir) -> tuple[dict, str]:
    code, stdout, err = cli(["report", str(run_dir), "--quiet"])
    assert code == 0, err
    return json.loads((run_dir / "report" / "report.json").read_text()), stdout


def test_report_writes_json_and_plots_and_prints_tables(run_dir, reported):
    report, stdout = reported
    best = best_trial(RunStore(run_dir).read_trials())
    for name in ("fitness.png", "coefficients.png", "pareto.png"):
        assert (run_dir / "report" / name).read_bytes()[:8] == PNG, name
    assert report["scored"] and report["trial"]["trial"] == best.trial
    assert report["run"]["objectives"] == ["tiny_search/acc", "tiny_search2/acc"]
    for split, tasks in (
        ("heldout", ["tiny_heldout"]),
        ("search", ["tiny_search", "tiny_search2"]),
    ):
        kinds = [r["kind"] for r in report[split]]
        assert kinds == ["evolved", "parent", "parent", "uniform", "task_arithmetic", "ties",
                         "greedy_soup", "ensemble"]  # fmt: skip
        for r in report[split]:
            assert list(r["tasks"]) == tasks
            assert math.isclose(r["mean"], statistics.fmean(r["tasks"].values()))
    assert report["search"][0]["metrics"] == best.scores
    assert f"trial {best.trial} (best)" in stdout and "held-out report: tiny" in stdout
    assert "output ensemble (2 parents)" in stdout and "pareto.png" in stdout


def test_every_row_has_an_interval_against_the_evolved_row(run_dir, reported):
    """The intervals in report.json are the bootstrap of the rows' own items, kept in
    items.npz: recomputed here from the raw file, and each row's items average to its table
    value (they are that row's items)."""
    report, stdout = reported
    assert report["comparison"]["items"] == {"search": 24, "heldout": 12}
    with np.load(run_dir / "report" / ITEMS) as z:
        saved = {k: z[k] for k in z.files}
    assert str(saved["fingerprint"]) == report["fingerprint"]
    for split in ("search", "heldout"):
        rows = report[split]
        tasks = list(rows[0]["tasks"])
        values = {t: saved[f"values/{split}/{t}"] for t in tasks}  # (rows, items)
        for i, row in enumerate(rows):
            for t in tasks:
                assert math.isclose(values[t][i].mean(), row["tasks"][t], abs_tol=1e-12)
        want = paired_bootstrap({t: v[1:] - v[0] for t, v in values.items()})
        assert "vs_evolved" not in rows[0]
        for row, iv in zip(rows[1:], want, strict=True):
            vs = row["vs_evolved"]
            assert vs == {"diff": iv.diff, "ci": [iv.low, iv.high], "significant": iv.significant}
            assert math.isclose(vs["diff"], row["mean"] - rows[0]["mean"], abs_tol=1e-12)
    assert "vs evolved" in stdout and "paired bootstrap, 2000 resamples" in stdout


def test_search_fitness_is_recorded_and_remeasured(run_dir, reported):
    """The report re-scores the winner on every search item: at full fidelity with the study's
    own scorer, the re-measurement equals what the trial recorded."""
    report, stdout = reported
    records = RunStore(run_dir).read_trials()
    best = best_trial(records)
    fit = report["search_fitness"]
    assert fit["trial"] == best.trial and fit["recorded"] == best.fitness
    assert fit["trials"] == len(records) and fit["fidelity"] == "full"
    assert fit["remeasured"] == pytest.approx(best.fitness, abs=1e-12)
    assert (
        f"search fitness: recorded {best.fitness[0]:.4f} / {best.fitness[1]:.4f} (trial " in stdout
    )


def test_a_cached_table_without_intervals_is_completed_from_its_items(run_dir, reported, tmp_path):
    """A report.json whose table has no intervals (as an earlier version wrote it) gets them
    from items.npz without scoring; with no items, `--no-heldout` shows it as it is and a
    scoring report computes them."""
    copy = tmp_path / "tiny"
    shutil.copytree(run_dir, copy)
    written = Report.model_validate(reported[0])
    earlier = written.model_copy(update={
        "comparison": None,
        **{sp: tuple(r.model_copy(update={"vs_evolved": None}) for r in written.rows(sp))
           for sp in ("search", "heldout")},
    })  # fmt: skip
    (copy / "report" / "report.json").write_text(earlier.to_json())
    again = build_report(open_run(copy), heldout=False, progress=False)
    assert again.cached and again.heldout == written.heldout and again.search == written.search
    assert again.comparison == written.comparison
    (copy / "report" / ITEMS).unlink()
    as_is = build_report(open_run(copy), heldout=False, progress=False)
    assert as_is.cached and as_is.comparison is None and as_is.heldout == earlier.heldout
    scored = build_report(open_run(copy), progress=False)
    assert not scored.cached and scored.heldout == written.heldout
    assert (copy / "report" / ITEMS).is_file()


def test_second_report_reuses_the_cache(run_dir, reported):
    code, stdout, err = cli(["report", str(run_dir), "--no-heldout", "--json", "--quiet"])
    assert code == 0, err
    again = json.loads(stdout)
    assert again["cached"] and again["heldout"] == reported[0]["heldout"]


def test_a_cached_report_is_the_scored_one(run_dir, reported):
    """From the cache, build_report gives what scoring wrote, field for field."""
    written = Report.model_validate(reported[0])  # as `evomerge report` first wrote it
    again = build_report(open_run(run_dir), heldout=False, progress=False)
    assert again.cached and not written.cached
    assert again.model_copy(update={"created": written.created, "cached": False}) == written


def test_without_the_table_the_report_says_so(run_dir, reported):
    report = build_report(open_run(run_dir), heldout=False, progress=False, use_cache=False)
    assert not report.scored and report.notes == (NOT_COMPUTED,) and report.search == ()
    assert "seconds" not in json.loads(report.to_json())
    records = RunStore(run_dir).read_trials()
    assert report.trial.trial == best_trial(records).trial and report.trial.is_best
    fitness = [t.fitness[0] for t in report.top_trials]
    assert len(fitness) == min(5, len(records)) and fitness == sorted(fitness, reverse=True)


def test_open_run_refuses_a_trial_that_now_decodes_differently(run_dir, tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(run_dir, copy)
    lines = (copy / "trials.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    lines[0] = json.dumps({**rec, "recipe_hash": "0" * 16}, sort_keys=True)
    (copy / "trials.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="decodes to a different recipe"):
        open_run(copy, rec["trial"])


def test_notebook_runs_on_the_run(run_dir, reported, tmp_path, monkeypatch):
    """The notebook shows the cached table and the three plots (the kernel inherits our env)."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    path = Path(__file__).resolve().parents[1] / "notebooks" / "analyze_study.ipynb"
    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv("EVOMERGE_RUN_DIR", str(run_dir))
    monkeypatch.setenv("EVOMERGE_COMPUTE_HELDOUT", "0")  # the table comes from the cache
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "held-out report: tiny" in text and "output ensemble" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 6  # fitness, coefficients, pareto, best_scores, generations, utilization
    assert not [o for o in outputs if o.output_type == "error"]


def _record(trial: int, status: str = "ok", fitness=(0.5,), dup=None) -> TrialRecord:
    return TrialRecord(trial=trial, proposal=trial, status=status, genome={}, recipe_hash=str(trial),
                       fitness=list(fitness) if fitness else None, duplicate_of=dup)  # fmt: skip


def test_select_trial_rules(tmp_path):
    recs = [_record(0, fitness=(0.2,)), _record(1, "failed", None), _record(2, fitness=(0.7,)),
            _record(3, "duplicate", (0.2,), dup=0)]  # fmt: skip
    assert select_trial(recs, None, tmp_path).trial == 2
    assert select_trial(recs, 3, tmp_path).trial == 0  # a duplicate stands for its original
    with pytest.raises(ConfigError, match="failed"):
        select_trial(recs, 1, tmp_path)
    with pytest.raises(ConfigError, match="no such trial"):
        select_trial(recs, 7, tmp_path)
    with pytest.raises(RunDirError, match="no successful trial"):
        select_trial([recs[1]], None, tmp_path)

"""Every run directory holds an Optuna storage that optuna-dashboard opens (evomerge/tracking).

cma studies are mirrored into RUN_DIR/optuna.journal; Optuna samplers' own optuna.db carries the
same user attributes. Read back with Optuna's own API and over optuna-dashboard's HTTP API.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from evomerge.cli import main
from evomerge.runstore import RunStore, TrialRecord
from evomerge.tracking import MIRROR
from tests.study_factory import make_tiny_study, with_changes


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny study whose space has a method choice per group (a categorical gene)."""
    root = tmp_path_factory.mktemp("tracking_optuna")
    make_tiny_study(root, preset="method_choice", max_trials=6)
    with_changes(root, "tpe", optimizer={"name": "optuna_tpe"})
    return root


def run(args: list[str], capsys) -> int:
    code = main([*args, "--quiet"])
    assert code == 0, capsys.readouterr().err
    return code


@pytest.fixture(scope="module")
def cma_run(root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cma_runs")
    assert main(["run", str(root / "study.yaml"), "--runs-dir", str(out), "--quiet"]) == 0
    return out / "tiny"


@pytest.fixture(scope="module")
def tpe_run(root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tpe_runs")
    assert main(["run", str(root / "tpe.yaml"), "--runs-dir", str(out), "--quiet"]) == 0
    return out / "tiny"


def journal(run_dir: Path) -> optuna.Study:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(run_dir / MIRROR)))
    return optuna.load_study(study_name="evomerge", storage=storage)


def assert_same(trial: optuna.trial.FrozenTrial, rec: TrialRecord) -> None:
    """One Optuna trial against its line of trials.jsonl."""
    attrs = trial.user_attrs
    assert attrs["trial"] == rec.trial and attrs["recipe_hash"] == rec.recipe_hash
    assert attrs["worker"] == rec.worker and attrs["fidelity"] == rec.fidelity
    assert attrs["status"] == rec.status
    for task, metrics in rec.scores.items():
        for metric, value in metrics.items():
            assert attrs[f"{task}.{metric}"] == pytest.approx(value)
    assert {k: attrs[f"seconds.{k}"] for k in rec.seconds} == rec.seconds
    if rec.ok:
        assert trial.state == TrialState.COMPLETE and trial.values == pytest.approx(rec.fitness)
    else:
        assert trial.state == TrialState.FAIL
    assert set(trial.params) == set(rec.genome)
    for name, value in rec.genome.items():
        if isinstance(value, str):
            assert trial.params[name] == value
        else:
            assert math.isclose(trial.params[name], value, rel_tol=0, abs_tol=1e-12)


def test_cma_study_is_mirrored_with_distributions(cma_run):
    records = RunStore(cma_run).read_trials()
    assert len(records) == 6
    study = journal(cma_run)
    trials = study.get_trials()
    assert [t.number for t in trials] == [r.trial for r in records]  # same numbers, in order
    for t, rec in zip(trials, records, strict=True):
        assert_same(t, rec)
    dists = trials[0].distributions
    methods = {n: d for n, d in dists.items() if n.endswith(".method")}
    assert methods and all(isinstance(d, CategoricalDistribution) for d in methods.values())
    assert set(next(iter(methods.values())).choices) == {"task_arithmetic", "ties", "linear"}
    density = next(d for n, d in dists.items() if n.endswith("ties.s1.density"))
    assert isinstance(density, FloatDistribution) and (density.low, density.high) == (0.1, 1.0)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE]
    best = max(r.fitness[0] for r in records if r.ok)
    assert study.best_value == pytest.approx(best)


def test_resume_catches_up_without_duplicates(cma_run, tmp_path, capsys):
    """A crash between the append and the mirror: the mirror lacks the last lines; resume adds
    them (once, keyed by trial number) and then mirrors the new trials."""
    import shutil

    from evomerge.study import load_run_config
    from evomerge.study_plan import build_plan
    from evomerge.tracking.optuna_mirror import rebuild_mirror

    run_dir = tmp_path / "tiny"
    shutil.copytree(cma_run, run_dir, ignore=shutil.ignore_patterns(".lock"))
    records = RunStore(run_dir).read_trials()
    plan = build_plan(load_run_config(RunStore(run_dir)))
    rebuild_mirror(run_dir / MIRROR, plan.space.dimensions(), 1, records[:3])
    assert len(journal(run_dir).trials) == 3
    run(["resume", str(run_dir), "--max-trials", "9"], capsys)
    records = RunStore(run_dir).read_trials()
    trials = journal(run_dir).get_trials()
    assert len(records) == 9
    assert [t.user_attrs["trial"] for t in trials] == list(range(9))
    for t, rec in zip(trials, records, strict=True):
        assert_same(t, rec)


def test_rebuild_state_rebuilds_the_mirror(cma_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "tiny"
    shutil.copytree(cma_run, run_dir, ignore=shutil.ignore_patterns(".lock"))
    (run_dir / MIRROR).write_text('{"op_code": 0, "worker_id": "x"}\nnot json\n')  # corrupt
    (run_dir / "optimizer.pkl").unlink()
    run(["resume", str(run_dir), "--rebuild-state", "--max-trials", "7"], capsys)
    records = RunStore(run_dir).read_trials()
    trials = journal(run_dir).get_trials()
    assert [t.user_attrs["trial"] for t in trials] == [r.trial for r in records]


def test_optuna_sampler_storage_carries_the_user_attrs(tpe_run):
    records = RunStore(tpe_run).read_trials()
    study = optuna.load_study(study_name="evomerge", storage=f"sqlite:///{tpe_run / 'optuna.db'}")
    by_trial = {t.user_attrs["trial"]: t for t in study.get_trials() if "trial" in t.user_attrs}
    assert sorted(by_trial) == [r.trial for r in records] and len(study.trials) == len(records)
    for rec in records:
        assert_same(by_trial[rec.trial], rec)
        assert by_trial[rec.trial].number == rec.proposal  # one worker: proposal = trial number
    assert not (tpe_run / MIRROR).exists()  # the sampler's own storage is the run's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def test_optuna_dashboard_serves_the_mirror(cma_run):
    """`optuna-dashboard RUN_DIR/optuna.journal`, as the README says (an Optuna sampler's
    optuna.db is a plain Optuna SQLite storage, which the dashboard has always opened)."""
    pytest.importorskip("optuna_dashboard")
    run_dir = cma_run
    storage = str(run_dir / MIRROR)
    port = _free_port()
    exe = Path(sys.executable).with_name("optuna-dashboard")
    proc = subprocess.Popen(
        [str(exe), storage, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while True:
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    out = proc.stdout.read().decode() if proc.poll() is not None else ""
                    pytest.fail(f"optuna-dashboard did not answer: {out[-2000:]}")
                time.sleep(0.2)
        (summary,) = studies
        assert summary["study_name"] == "evomerge"
        detail = _get(f"{base}/api/studies/{summary['study_id']}")
        records = RunStore(run_dir).read_trials()
        assert len(detail["trials"]) == len(records)
        best = max(r.fitness[0] for r in records if r.ok)
        assert detail["best_trials"][0]["values"] == [pytest.approx(best)]
        attrs = {a["key"] for a in detail["trials"][0]["user_attrs"]}
        assert {"trial", "recipe_hash", "worker", "tiny_search.acc", "seconds.total"} <= attrs
    finally:
        proc.terminate()
        proc.wait(10)


def test_sampler_attrs_catch_up_on_resume(tpe_run, tmp_path, capsys):
    """A crash after a trial's line but before its attributes: resume writes them (once)."""
    import shutil
    import sqlite3

    run_dir = tmp_path / "tiny"
    shutil.copytree(tpe_run, run_dir, ignore=shutil.ignore_patterns(".lock"))
    with sqlite3.connect(run_dir / "optuna.db") as db:
        ids = [r[0] for r in db.execute("SELECT trial_id FROM trials ORDER BY number")]
        db.execute(f"DELETE FROM trial_user_attributes WHERE trial_id IN ({ids[-2]}, {ids[-1]})")
    run(["resume", str(run_dir), "--max-trials", "8"], capsys)
    records = RunStore(run_dir).read_trials()
    study = optuna.load_study(study_name="evomerge", storage=f"sqlite:///{run_dir / 'optuna.db'}")
    assert len(records) == 8 and len(study.trials) == 8
    by_trial = {t.user_attrs["trial"]: t for t in study.get_trials()}
    assert sorted(by_trial) == list(range(8))
    for rec in records:
        assert_same(by_trial[rec.trial], rec)

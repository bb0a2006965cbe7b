"""The study loop end to end: run, status, failures as data, Ctrl-C and SIGKILL resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.recipe_loader import load_recipe_file
from evomerge.runstore import RunStore
from tests.study_factory import make_tiny_study, trial_sequence, wait_for_lines, with_changes

EVOMERGE = [sys.executable, "-m", "evomerge.cli"]


@pytest.fixture(scope="module")
def study_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("study")
    make_tiny_study(root)
    return root


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_to_budget_then_status_and_best(study_root, tmp_path, capsys):
    code, out, err = cli(
        ["run", str(study_root / "study.yaml"), "--runs-dir", str(tmp_path), "--quiet"], capsys
    )
    assert code == 0, err
    run_dir = tmp_path / "tiny"
    records = RunStore(run_dir).read_trials()
    assert len(records) == 6 and [r.trial for r in records] == list(range(6))
    assert len({r.proposal for r in records}) == 6
    assert all(r.status == "ok" and 0.0 <= r.scores["tiny_search"]["acc"] <= 1.0 for r in records)
    assert all(r.fitness == [r.scores["tiny_search"]["acc"]] for r in records)
    code, out, _ = cli(["status", str(run_dir), "--json"], capsys)
    info = json.loads(out)
    best = max(records, key=lambda r: (r.fitness[0], -r.trial))
    assert info["state"] == "finished" and info["trials_completed"] == 6 and info["budget"] == 6
    assert info["best"]["trial"] == best.trial and info["best"]["fitness"] == best.fitness[0]
    recipe = load_recipe_file(run_dir / "best" / "recipe.yaml")
    assert recipe.content_hash() == best.recipe_hash
    # the resolved config is stored with defaults filled in
    stored = yaml.safe_load((run_dir / "study.yaml").read_text())
    assert stored["optimizer"]["name"] == "cma" and stored["executor"]["kind"] == "local"
    code, _, err = cli(["run", str(study_root / "study.yaml"), "--runs-dir", str(tmp_path)], capsys)
    assert code == 2 and "already exists" in err and "evomerge resume" in err


def test_failed_candidate_is_recorded_not_fatal(study_root, tmp_path, capsys, monkeypatch):
    from evomerge.recipe import Section
    from evomerge.worker import Worker

    real = Worker.evaluate
    calls = {"n": 0}

    def flaky(self, recipe, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # our own code path raising, as a broken candidate would
            recipe = recipe.model_copy(
                update={
                    "sections": [Section(method="linear", models={"s1": {"weight": float("nan")}})]
                }
            )
        return real(self, recipe, *args, **kwargs)

    monkeypatch.setattr(Worker, "evaluate", flaky)
    code, _, err = cli(
        [
            "run",
            str(study_root / "study.yaml"),
            "--runs-dir",
            str(tmp_path),
            "--max-trials",
            "4",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    records = RunStore(tmp_path / "tiny").read_trials()
    assert [r.status for r in records].count("failed") == 1 and len(records) == 4
    failed = next(r for r in records if r.status == "failed")
    assert failed.fitness is None and "NaN" in failed.error


@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer",
    [{"name": "cma", "popsize": 4, "sigma0": 0.3}, {"name": "optuna_tpe", "n_startup_trials": 3}],
)
def test_sigkill_then_resume_equals_uninterrupted(study_root, tmp_path, optimizer):
    study = with_changes(
        study_root, f"kill-{optimizer['name']}", optimizer=optimizer, budget__max_trials=120
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    whole = tmp_path / "whole"
    subprocess.run(
        [*EVOMERGE, "run", str(study), "--runs-dir", str(whole), "--name", "r", "--quiet"],
        check=True,
        env=env,
        capture_output=True,
    )
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [*EVOMERGE, "run", str(study), "--runs-dir", str(cut), "--name", "r", "--quiet"],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    wait_for_lines(cut / "r" / "trials.jsonl", 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert RunStore(cut / "r").state()["state"] == "interrupted"
    done_before = len(RunStore(cut / "r").read_trials())
    assert 5 <= done_before < 120  # far past the kill point: a tiny trial takes ~10 ms
    res = subprocess.run(
        [*EVOMERGE, "resume", str(cut / "r"), "--quiet"], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert trial_sequence(cut / "r") == trial_sequence(whole / "r")
    assert RunStore(cut / "r").state()["state"] == "finished"


def test_ctrl_c_marks_interrupted_and_resume_finishes(study_root, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    study = with_changes(study_root, "sigint", budget__max_trials=400)  # far past the signal
    proc = subprocess.Popen(
        [*EVOMERGE, "run", str(study), "--runs-dir", str(tmp_path), "--name", "r", "--quiet"],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    wait_for_lines(tmp_path / "r" / "trials.jsonl", 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert "evomerge resume" in err.decode()
    store = RunStore(tmp_path / "r")
    assert store.state()["state"] == "interrupted"
    n = len(store.read_trials())
    res = subprocess.run(
        [*EVOMERGE, "resume", str(tmp_path / "r"), "--quiet", "--max-trials", str(n + 2)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    records = store.read_trials()
    assert len(records) == n + 2 and len({r.proposal for r in records}) == n + 2


@pytest.mark.parametrize(
    ("executor", "sig", "code"),
    [
        ("local", signal.SIGINT, 130),
        ("local", signal.SIGTERM, 143),
        pytest.param("ray", signal.SIGINT, 130, marks=pytest.mark.ray),  # inside ray.init
    ],
)
def test_signal_while_workers_start_marks_interrupted_and_run_starts_again(
    study_root, tmp_path, executor, sig, code
):
    """Ctrl-C or SIGTERM while the workers start (before any trial): state.json says
    interrupted (not running with a dead pid), and the same `run` again is not refused with
    "already exists": it starts that run over, and it ends with exactly the budget."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    study = with_changes(study_root, f"setup-{sig.name}", budget__max_trials=3)
    cmd = [*EVOMERGE, "run", str(study), "--runs-dir", str(tmp_path), "--name", "r", "--quiet"]
    cmd += ["--executor", executor, "--workers", "1"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    run_dir = tmp_path / "r"
    t0 = time.time()
    # optimizer.pkl is saved just before the workers start, which takes seconds (models, tasks)
    while not (run_dir / "optimizer.pkl").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() - t0 < 120, "the run never reached its setup"
        time.sleep(0.002)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err.decode()[-2000:]
    assert (run_dir / "trials.jsonl").read_text() == ""  # the signal came during setup
    on_disk = json.loads((run_dir / "state.json").read_text())
    assert on_disk["state"] == "interrupted" and on_disk["pid"] == proc.pid
    assert "before the first trial" in err.decode()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "again: its earlier start recorded no trial" in res.stderr
    assert [r.trial for r in RunStore(run_dir).read_trials()] == [0, 1, 2]
    assert RunStore(run_dir).state()["state"] == "finished"


def test_dry_run_prints_genome_and_recipe_and_writes_nothing(study_root, tmp_path, capsys):
    code, out, err = cli(
        ["run", str(study_root / "study.yaml"), "--runs-dir", str(tmp_path), "--dry-run"], capsys
    )
    assert code == 0, err
    assert "6 genes" in out and "evomerge_recipe: 1" in out and "method: linear" in out
    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"search_space": {"preset": "tise"}}, "did you mean 'ties'"),
        ({"optimizer": {"name": "cmaa"}}, "did you mean 'cma'"),
        ({"search_space": {"preset": "linear", "granularity": 3}}, "does not divide"),
        (
            {
                "search_space": {
                    "preset": "linear",
                    "methods": {
                        "linear": {"per_model": {"weight": {"low": 1, "high": 0, "init": 0.5}}}
                    },
                }
            },
            "low",
        ),
        ({"tasks": {"search": ["no_such_task"], "include_path": ["tasks"]}}, "no_such_task"),
        (
            {
                "models": {
                    "base": "models/base",
                    "sources": [
                        {"name": "s1", "path": "models/s1"},
                        {"name": "s2", "path": "models/nope"},
                    ],
                }
            },
            "models/nope",
        ),
        (
            {
                "search_space": {"preset": "slerp"},
                "models": {
                    "base": "models/base",
                    "sources": [
                        {"name": "a", "path": "models/s1"},
                        {"name": "b", "path": "models/s2"},
                        {"name": "c", "path": "models/s1"},
                    ],
                },
            },
            "slerp",
        ),
        ({"budget": {"max_trials": 0}}, "max_trials"),
    ],
)
def test_bad_study_is_one_line_exit_2(study_root, tmp_path, capsys, changes, needle):
    path = with_changes(study_root, f"bad-{abs(hash(needle))}", **changes)
    code, _, err = cli(["run", str(path), "--runs-dir", str(tmp_path)], capsys)
    assert code == 2, err
    assert err.startswith("evomerge: error: ") and err.count("\n") == 1, err
    assert needle in err
    assert not any(tmp_path.iterdir())


def test_resume_of_a_folder_without_study(tmp_path, capsys):
    code, _, err = cli(["resume", str(tmp_path)], capsys)
    assert code == 2 and "holds no study" in err
    code, _, err = cli(["status", str(tmp_path / "missing")], capsys)
    assert code == 2 and "does not exist" in err


def test_resume_rewrites_a_missing_or_stale_best(study_root, tmp_path, capsys):
    import shutil

    code, _, err = cli(
        ["run", str(study_root / "study.yaml"), "--runs-dir", str(tmp_path), "--quiet",
         "--max-trials", "4"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    run_dir = tmp_path / "tiny"
    store = RunStore(run_dir)
    best = max(store.read_trials(), key=lambda r: (r.fitness[0], -r.trial))
    shutil.rmtree(run_dir / "best")
    assert not store.best_is(best)
    code, _, err = cli(["resume", str(run_dir), "--quiet", "--max-trials", "5"], capsys)
    assert code == 0, err
    now = max(store.read_trials(), key=lambda r: (r.fitness[0], -r.trial))
    assert store.best_is(now)
    assert load_recipe_file(run_dir / "best" / "recipe.yaml").content_hash() == now.recipe_hash

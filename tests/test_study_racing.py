"""Racing studies end to end: rungs recorded per candidate, the optimizer told once per
candidate, the best only at full fidelity, fewer items than full fidelity, exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.runstore import RunStore
from tests.study_factory import make_tiny_study, wait_for_lines, write_task

EVOMERGE = [sys.executable, "-m", "evomerge.cli"]


@pytest.fixture(scope="module")
def racing_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("racing")
    make_tiny_study(root)
    write_task(root / "tasks", "tiny_search", seed=1, n=90)  # enough items to race on
    return root


def study_file(root: Path, name: str, **changes) -> Path:
    data = yaml.safe_load((root / "study.yaml").read_text())
    data["fitness"] = {"fidelity": "racing", "rungs": 3, "eta": 3, "min_items": 4}
    for key, value in changes.items():
        data[key] = value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def lines(run_dir: Path) -> list[tuple]:
    return [
        (r.trial, r.proposal, r.rung, r.items, r.fitness, json.dumps(r.genome, sort_keys=True))
        for r in RunStore(run_dir).read_trials()
    ]


@pytest.mark.parametrize(
    "optimizer",
    [{"name": "cma", "popsize": 6, "sigma0": 0.3}, {"name": "optuna_tpe", "n_startup_trials": 4}],
)
def test_racing_study_records_rungs_and_spends_fewer_items(
    racing_root, tmp_path, optimizer, capsys
):
    path = study_file(racing_root, f"race-{optimizer['name']}", optimizer=optimizer)
    code = main(["run", str(path), "--runs-dir", str(tmp_path), "--quiet", "--max-trials", "12"])
    assert code == 0, capsys.readouterr().err
    store = RunStore(tmp_path / "tiny")
    records = store.read_trials()
    assert len({r.proposal for r in records}) == 12  # the budget counts candidates
    assert {r.rung for r in records} <= {0, 1, 2} and any(r.rung == 0 for r in records)
    for r in records:
        assert r.items == store.read_items(r.trial).count
    assert sum(r.items for r in records) <= 12 * 90  # an item is never scored twice
    best = json.loads((tmp_path / "tiny" / "best" / "trial.json").read_text())
    assert best["fidelity"] == 1.0 and best["rung"] == 2  # the best rests on every item
    full = [r for r in records if r.fidelity == 1.0]
    assert best["fitness"][0] == max(r.fitness[0] for r in full)
    for r in records:  # an estimate is the mean of the candidate's items so far
        per = [x for x in records if x.proposal == r.proposal and x.trial <= r.trial]
        count = sum(x.items for x in per)
        assert r.fidelity == pytest.approx(count / 90)
        if r.fidelity < 1.0:
            assert r.ci is not None and r.ci[0] <= r.fitness[0] <= r.ci[1]
    state = json.loads((tmp_path / "tiny" / "state.json").read_text())
    assert state["state"] == "finished"


def test_racing_on_the_small_demo_zoo_runs_to_its_budget(small_zoo, tmp_path, capsys):
    """On the small demo zoo (real skills, lm-eval generate_until and multiple-choice tasks):
    every item is scored at most once per candidate and the best rests on every item. (How much
    racing saves depends on how far apart the candidates are: tests/test_racing.py measures it on
    candidates of known skill.)"""
    data = yaml.safe_load(Path(small_zoo.study).read_text())
    data["fitness"] = {"fidelity": "racing", "rungs": 3, "eta": 3}
    data["optimizer"] = {"name": "cma", "popsize": 8, "sigma0": 0.5}  # diverse candidates
    data["executor"] = {"kind": "local", "workers": 1}
    data["budget"] = {"max_trials": 24}
    path = tmp_path / "race.yaml"
    path.write_text(yaml.safe_dump(data))
    code = main(["run", str(path), "--runs-dir", str(tmp_path), "--quiet"])
    assert code == 0, capsys.readouterr().err
    store = RunStore(tmp_path / data["name"])
    records = store.read_trials()
    counts = json.loads((store.dir / "items" / "counts.json").read_text())
    total = sum(counts.values())
    assert len({r.proposal for r in records}) == 24
    for proposal in {r.proposal for r in records}:
        assert sum(r.items for r in records if r.proposal == proposal) <= total
    best = json.loads((store.dir / "best" / "trial.json").read_text())
    assert best["fidelity"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer",
    [{"name": "cma", "popsize": 6, "sigma0": 0.3}, {"name": "optuna_tpe", "n_startup_trials": 4}],
)
@pytest.mark.parametrize("kill_after", [5, 9])
def test_racing_resume_after_sigkill_equals_uninterrupted(
    racing_root, tmp_path, optimizer, kill_after
):
    path = study_file(
        racing_root,
        f"kill-{optimizer['name']}-{kill_after}",
        optimizer=optimizer,
        budget={"max_trials": 60},
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    whole = tmp_path / "whole"
    subprocess.run(
        [*EVOMERGE, "run", str(path), "--runs-dir", str(whole), "--name", "r", "--quiet"],
        check=True,
        env=env,
        capture_output=True,
    )
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [*EVOMERGE, "run", str(path), "--runs-dir", str(cut), "--name", "r", "--quiet"],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    wait_for_lines(cut / "r" / "trials.jsonl", kill_after, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(lines(cut / "r")) < len(lines(whole / "r"))  # killed mid-study
    res = subprocess.run(
        [*EVOMERGE, "resume", str(cut / "r"), "--quiet"], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert lines(cut / "r") == lines(whole / "r")  # the same trials, rungs and items


def test_racing_with_the_irt_estimator_runs_and_refits(racing_root, tmp_path, capsys):
    path = study_file(
        racing_root,
        "race-irt",
        fitness={"fidelity": "racing", "estimator": "irt", "rungs": 2, "eta": 3, "min_items": 4},
    )
    code = main(["run", str(path), "--runs-dir", str(tmp_path), "--quiet", "--max-trials", "14"])
    assert code == 0, capsys.readouterr().err
    records = RunStore(tmp_path / "tiny").read_trials()
    full = [r for r in records if r.fidelity == 1.0]
    assert len({r.proposal for r in records}) == 14 and len(full) >= 8
    partial = [r for r in records if r.fidelity < 1.0]
    assert all(r.ci is not None and r.ci[0] <= r.fitness[0] <= r.ci[1] for r in partial)

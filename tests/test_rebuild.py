"""Rebuilding a lost or damaged optimizer state from trials.jsonl (evomerge/rebuild.py), and the
messages for a damaged run directory: real garbage in real state files, real resumes."""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.optimizers import OPTIMIZERS, Dimension, create_optimizer
from evomerge.optimizers.base import ReplayMismatchError, Told
from evomerge.run_lock import LOCK
from evomerge.runstore import RunStore
from tests.study_factory import make_tiny_study

CMA = {"name": "cma", "popsize": 4, "sigma0": 0.3}
TPE = {"name": "optuna_tpe", "n_startup_trials": 3}
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
EVOMERGE = [sys.executable, "-m", "evomerge.cli"]


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Path]:
    """The tiny study with each optimizer (one set of models and tasks)."""
    import yaml

    root = tmp_path_factory.mktemp("rebuild")
    base = make_tiny_study(root)
    out = {}
    for opt in (CMA, TPE):
        data = yaml.safe_load(base.read_text())
        data["optimizer"] = opt
        path = root / f"{opt['name']}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        out[opt["name"]] = path
    return out


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def start(study: Path, runs: Path, trials: int, capsys) -> Path:
    code, _, err = cli(
        ["run", str(study), "--runs-dir", str(runs), "--max-trials", str(trials), "--quiet"],
        capsys,
    )
    assert code == 0, err
    return runs / "tiny"


def sequence(run_dir: Path) -> list[tuple]:
    return [
        (r.trial, r.proposal, json.dumps(r.genome, sort_keys=True), r.fitness, r.status)
        for r in RunStore(run_dir).read_trials()
    ]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != LOCK
    }


def damage(path: Path, how: str) -> None:
    if how == "garbage":
        path.write_bytes(random.Random(0).randbytes(3000))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "missing":
        path.unlink()
    elif how == "other pickle":
        path.write_bytes(pickle.dumps({"something": "else"}))


@pytest.mark.parametrize(
    ("optimizer", "file", "how", "what"),
    [
        ("cma", "optimizer.pkl", "garbage", "is not a readable cma state ("),
        ("cma", "optimizer.pkl", "empty", "is empty (0 bytes)"),
        ("cma", "optimizer.pkl", "missing", "is missing"),
        ("cma", "optimizer.pkl", "other pickle", "is not an evomerge cma state"),
        (
            "optuna_tpe",
            "optuna.db",
            "garbage",
            "is not a readable database (file is not a database)",
        ),
        ("optuna_tpe", "optuna.db", "empty", "is empty (0 bytes)"),
        ("optuna_tpe", "optuna.db", "missing", "is missing"),
    ],
)
def test_a_bad_state_is_one_line_offering_the_rebuild_and_changes_nothing(
    studies, tmp_path, capsys, optimizer, file, how, what
):
    run_dir = start(studies[optimizer], tmp_path, 4, capsys)
    damage(run_dir / file, how)
    before = snapshot(run_dir)
    code, _, err = cli(["resume", str(run_dir), "--max-trials", "8", "--quiet"], capsys)
    assert code == 2, err
    hint = (
        "; rebuild it from the 4 trials in trials.jsonl with: "
        f"evomerge resume {run_dir} --rebuild-state\n"
    )
    assert err.startswith(f"evomerge: error: {run_dir / file} {what}"), err
    assert err.endswith(hint) and err.count("\n") == 1 and len(err) < 400, err
    assert snapshot(run_dir) == before  # not even --max-trials 8 was written


@pytest.mark.parametrize("how", ["garbage", "missing"])
def test_cma_rebuilt_from_trials_continues_exactly_as_the_uninterrupted_run(
    studies, tmp_path, capsys, how
):
    whole = start(studies["cma"], tmp_path / "whole", 14, capsys)
    cut = start(studies["cma"], tmp_path / "cut", 6, capsys)  # stops inside generation 2
    damage(cut / "optimizer.pkl", how)
    code, _, err = cli(["resume", str(cut), "--max-trials", "14", "--quiet"], capsys)
    assert code == 2 and "--rebuild-state" in err
    args = ["resume", str(cut), "--max-trials", "14", "--rebuild-state", "--quiet"]
    code, _, err = cli(args, capsys)
    assert code == 0, err
    assert "rebuilt the cma optimizer state from 6 trials in trials.jsonl" in err
    assert ("state-before-rebuild" in err) == (how == "garbage")
    assert sequence(cut) == sequence(whole)


@pytest.mark.slow
def test_cma_rebuilt_after_sigkill_continues_exactly(studies, tmp_path, capsys):
    """Killed mid-run (a proposal asked and never told), state lost: the rebuild leaves that
    proposal to be asked again and the run ends with the uninterrupted run's trials."""
    whole = start(studies["cma"], tmp_path / "whole", 60, capsys)
    cmd = [*EVOMERGE, "run", str(studies["cma"]), "--runs-dir", str(tmp_path / "cut"), "--quiet"]
    proc = subprocess.Popen([*cmd, "--max-trials", "60"], env=ENV, stderr=subprocess.PIPE)
    trials = tmp_path / "cut" / "tiny" / "trials.jsonl"
    t0 = time.time()
    while not (trials.exists() and trials.read_text().count("\n") >= 5):
        assert proc.poll() is None and time.time() - t0 < 300, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cut = tmp_path / "cut" / "tiny"
    assert 5 <= len(RunStore(cut).read_trials()) < 60
    (cut / "optimizer.pkl").unlink()
    code, _, err = cli(["resume", str(cut), "--rebuild-state", "--quiet"], capsys)
    assert code == 0, err
    assert sequence(cut) == sequence(whole)


def _history(db: Path, n: int) -> list[tuple]:
    import optuna

    study = optuna.load_study(study_name="evomerge", storage=f"sqlite:///{db}")
    return [(t.number, t.state, t.params, t.values) for t in study.get_trials()[:n]]


def test_optuna_rebuilt_from_trials_has_the_told_history_and_completes(studies, tmp_path, capsys):
    """TPE reads only the trials, and the sampler is seeded from (seed, trials asked): with one
    worker the rebuilt study continues exactly as the uninterrupted one."""
    whole = start(studies["optuna_tpe"], tmp_path / "whole", 10, capsys)
    cut = start(studies["optuna_tpe"], tmp_path / "cut", 5, capsys)
    shutil.copy(cut / "optuna.db", tmp_path / "original.db")
    damage(cut / "optuna.db", "garbage")
    args = ["resume", str(cut), "--max-trials", "10", "--rebuild-state", "--quiet"]
    code, _, err = cli(args, capsys)
    assert code == 0, err
    assert "rebuilt the optuna_tpe optimizer state from 5 trials" in err
    assert len(RunStore(cut).read_trials()) == 10
    assert _history(cut / "optuna.db", 5) == _history(tmp_path / "original.db", 5)
    assert _history(cut / "optuna.db", 10) == _history(whole / "optuna.db", 10)
    assert sequence(cut) == sequence(whole)


def test_a_record_that_does_not_replay_is_refused_and_the_state_put_back(studies, tmp_path, capsys):
    run_dir = start(studies["cma"], tmp_path, 4, capsys)
    lines = (run_dir / "trials.jsonl").read_text().splitlines(keepends=True)
    rec = json.loads(lines[1])
    gene = sorted(rec["genome"])[0]
    rec["genome"][gene] = 0.123456
    lines[1] = json.dumps(rec, sort_keys=True) + "\n"
    (run_dir / "trials.jsonl").write_text("".join(lines))
    before = snapshot(run_dir)
    code, _, err = cli(["resume", str(run_dir), "--max-trials", "8", "--rebuild-state"], capsys)
    assert code == 2, err
    assert (
        err.startswith(
            f"evomerge: error: {run_dir}: trials.jsonl does not replay into the cma optimizer: "
            f"proposal 1: the replay proposes {gene} = "
        )
        and err.count("\n") == 1
    ), err
    assert "trials.jsonl records 0.123456; the state cannot be rebuilt" in err
    assert snapshot(run_dir) == before  # optimizer.pkl put back, nothing set aside


def test_a_bad_line_in_trials_names_the_file_and_line(studies, tmp_path, capsys):
    run_dir = start(studies["cma"], tmp_path, 4, capsys)
    lines = (run_dir / "trials.jsonl").read_text().splitlines(keepends=True)
    lines.insert(2, '{"trial": 2, "status": "ok", oops}\n')
    (run_dir / "trials.jsonl").write_text("".join(lines))
    for args in (["resume", str(run_dir), "--max-trials", "8"], ["status", str(run_dir)]):
        code, _, err = cli(args, capsys)
        assert code == 2, err
        assert err == (
            f"evomerge: error: {run_dir / 'trials.jsonl'}, line 3: not valid JSON (Expecting "
            "property name enclosed in double quotes); only a torn last line is repaired by "
            "itself: fix or remove that line\n"
        )


# ---- Optimizer.replay, over every registered optimizer ------------------------------------

DIMS = (
    Dimension("a"),
    Dimension("b", -1.0, 2.0),
    Dimension("m", choices=("linear", "ties", "slerp")),
)
POP = {
    "cma": {"popsize": 4},
    "optuna_cmaes": {"popsize": 4},
    "optuna_nsga2": {"population_size": 4},
    "optuna_tpe": {"n_startup_trials": 4},
}


def toy(pid: int, params: dict) -> tuple[float, ...] | None:
    if pid % 5 == 3:
        return None  # a failed candidate now and then
    return (-((params["a"] - 0.3) ** 2) - abs(params["b"]) + (0.2 if params["m"] == "ties" else 0),)


def drive_optimizer(opt, n: int, workers: int, which: int = 0) -> list[Told]:
    """Ask up to `workers` ahead and tell one at a time, like the study loop: the oldest in
    flight (`which` 0), or another (then older proposals stay in flight below the highest told);
    the history told."""
    told: list[Told] = []
    in_flight: list = []
    while len(told) < n:
        while len(in_flight) < workers and (p := opt.ask()) is not None:
            in_flight.append(p)
        p = in_flight.pop(min(which, len(in_flight) - 1))
        opt.tell(p.id, toy(p.id, p.params))
        told.append(Told(p.id, dict(p.params), toy(p.id, p.params)))
    return told


def continuation(opt, k: int) -> list[tuple]:
    """The next k proposals (pending ones first), each told as it comes."""
    out: list[tuple] = []
    queue = sorted(opt.pending(), key=lambda p: p.id)
    while len(out) < k:
        p = queue.pop(0) if queue else opt.ask()
        out.append((p.id, json.dumps(p.params, sort_keys=True)))
        opt.tell(p.id, toy(p.id, p.params))
    return out


def fresh(name: str, state_dir: Path):
    return create_optimizer(
        name, DIMS, seed=3, options=POP.get(name, {}), state_dir=state_dir, x0={"m": "ties"}
    )


@pytest.mark.parametrize("name", sorted(OPTIMIZERS.names()))
def test_replay_with_one_worker_gives_the_exact_state(name, tmp_path):
    original = fresh(name, tmp_path / "a")
    told = drive_optimizer(original, 11, workers=1)
    rebuilt = fresh(name, tmp_path / "b")
    rebuilt.replay(told)
    assert continuation(rebuilt, 12) == continuation(original, 12)


def test_replay_of_cma_with_several_workers_is_exact(tmp_path):
    """Tells within a generation in another order than the asks: the state is the same."""
    original = fresh("cma", tmp_path / "a")
    told = drive_optimizer(original, 10, workers=3, which=2)
    top = max(t.proposal for t in told)
    gaps = [p.id for p in original.pending() if p.id < top]  # in flight at the "crash"
    assert gaps
    rebuilt = fresh("cma", tmp_path / "b")
    rebuilt.replay(told)
    assert [p.id for p in rebuilt.pending()] == gaps  # asked by the replay, to evaluate again
    assert continuation(rebuilt, 12) == continuation(original, 12)


@pytest.mark.parametrize("name", ["optuna_tpe", "optuna_nsga2"])
def test_replay_of_optuna_with_several_workers_keeps_the_told_history(name, tmp_path):
    """An interleaving trials.jsonl cannot recover: the history is added as it was told."""
    original = fresh(name, tmp_path / "a")
    told = drive_optimizer(original, 11, workers=3, which=1)
    rebuilt = fresh(name, tmp_path / "b")
    rebuilt.replay(told)
    trials = rebuilt.study.get_trials()
    assert any("fixed_params" in t.system_attrs for t in trials[1:])  # the history was added
    top = max(t.proposal for t in told)
    gaps = [p.id for p in original.pending() if p.id < top]
    assert [p.id for p in rebuilt.pending()] == gaps  # asked again, at their place

    def history(opt) -> list[tuple]:
        return [
            (t.number, t.state.name, t.params, t.values)
            for t in opt.study.get_trials()
            if t.state.is_finished()
        ]

    assert history(rebuilt) == history(original)
    assert len(continuation(rebuilt, 6)) == 6


def test_replay_refuses_a_proposal_recorded_twice(tmp_path):
    told = drive_optimizer(fresh("cma", tmp_path / "a"), 3, workers=1)
    with pytest.raises(ReplayMismatchError, match="proposal 1 is recorded twice"):
        fresh("cma", tmp_path / "b").replay([*told, told[1]])

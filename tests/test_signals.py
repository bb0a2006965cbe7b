"""SIGTERM is preemption (Slurm, Kubernetes, spot instances): real signals to real processes.

A study handles it like Ctrl-C: the bookkeeping in hand finishes, state.json says interrupted,
the resume hint is printed, exit 143, and `evomerge resume` ends with exactly the trials of an
uninterrupted run. Outside the study loop (export) it is one line and 143 too; with the Ray
executor it is 143 with Ray shut down, not Ray's abort (134).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evomerge.errors import EXIT_TERMINATED
from evomerge.runstore import RunStore
from tests.study_factory import make_tiny_study, trial_sequence, with_changes

EVOMERGE = [sys.executable, "-m", "evomerge.cli"]
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@pytest.fixture(scope="module")
def study_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sigterm_study")
    make_tiny_study(root)
    return root


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {n} trials in {path}")


def wait_for_sigterm_handler(proc: subprocess.Popen, timeout: float = 60) -> None:
    """Until the process catches SIGTERM (bit 15 of SigCgt in /proc): evomerge's handler is in."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        caught = int(next(x for x in status.splitlines() if x.startswith("SigCgt:")).split()[1], 16)
        if caught & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.02)
    raise AssertionError("the process never installed a SIGTERM handler")


def assert_one_clean_stderr(err: str) -> None:
    assert "Traceback" not in err and "Aborted" not in err and "SIGTERM received" not in err, err


@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer",
    [{"name": "cma", "popsize": 4, "sigma0": 0.3}, {"name": "optuna_tpe", "n_startup_trials": 3}],
    ids=["cma", "optuna_tpe"],
)
def test_sigterm_then_resume_equals_uninterrupted(study_root, tmp_path, optimizer):
    study = with_changes(
        study_root, f"term-{optimizer['name']}", optimizer=optimizer, budget__max_trials=60
    )
    whole = tmp_path / "whole"
    subprocess.run(
        [*EVOMERGE, "run", str(study), "--runs-dir", str(whole), "--name", "r", "--quiet"],
        check=True,
        env=ENV,
        capture_output=True,
    )
    cut = tmp_path / "cut"
    proc = subprocess.Popen(
        [*EVOMERGE, "run", str(study), "--runs-dir", str(cut), "--name", "r", "--quiet"],
        env=ENV,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    wait_for_lines(cut / "r" / "trials.jsonl", 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_TERMINATED, err[-3000:]
    assert_one_clean_stderr(err)
    store = RunStore(cut / "r")
    done = len(store.read_trials())
    assert 5 <= done < 60  # far past the signal point: a tiny trial takes ~10 ms
    assert f"terminated (SIGTERM) after {done} trials; continue with: evomerge resume" in err
    state = json.loads((cut / "r" / "state.json").read_text())  # written, not inferred
    assert state["state"] == "interrupted" and state["trials"] == done
    res = subprocess.run(
        [*EVOMERGE, "resume", str(cut / "r"), "--quiet"], env=ENV, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert trial_sequence(cut / "r") == trial_sequence(whole / "r")
    assert store.state()["state"] == "finished"


@pytest.mark.slow
def test_sigterm_during_export_is_one_line_and_leaves_nothing(study_root, tmp_path):
    runs = tmp_path / "runs"
    subprocess.run(
        [*EVOMERGE, "run", str(study_root / "study.yaml"), "--runs-dir", str(runs), "--quiet"],
        check=True,
        env=ENV,
        capture_output=True,
    )
    out = tmp_path / "exported"
    proc = subprocess.Popen(  # with the report: scoring the baselines takes seconds
        [*EVOMERGE, "export", str(runs / "tiny"), "--out", str(out), "--quiet"],
        env=ENV,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    wait_for_sigterm_handler(proc)
    time.sleep(1.0)  # into the export's own work (imports, planning, scoring)
    proc.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_TERMINATED, (stdout + err)[-3000:]
    assert err.strip() == "evomerge: terminated (SIGTERM)", err[-3000:]
    assert not out.exists() and not list(tmp_path.glob(".exported*"))  # no half checkpoint


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("target", ["driver", "group"])
def test_sigterm_with_the_ray_executor_exits_143_and_shuts_ray_down(study_root, tmp_path, target):
    """`group`: the whole process group, as `scancel` or a pod's deletion signal every process,
    so Ray's own processes (raylet, GCS) get the SIGTERM at the same moment as the study."""
    pytest.importorskip("ray")
    study = with_changes(
        study_root,
        "term-ray",
        budget__max_trials=400,
        executor={"kind": "ray", "workers": 1},
    )
    proc = subprocess.Popen(
        [*EVOMERGE, "run", str(study), "--runs-dir", str(tmp_path), "--name", "r", "--quiet"],
        env={**ENV, "RAY_AUTH_MODE": "disabled"},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group, like a batch job's
    )
    try:
        wait_for_lines(tmp_path / "r" / "trials.jsonl", 3, proc, timeout=300)
        ray_processes = _descendants(proc.pid)
        assert ray_processes, "a local Ray starts its processes under the study"
        if target == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_TERMINATED, err[-3000:]
    assert_one_clean_stderr(err)
    assert "continue with: evomerge resume" in err
    store = RunStore(tmp_path / "r")
    done = len(store.read_trials())
    assert 3 <= done < 400
    state = json.loads((tmp_path / "r" / "state.json").read_text())
    assert state["state"] == "interrupted" and state["trials"] == done
    deadline = time.time() + 30  # executor.close() ran: Ray's processes go with the study
    while time.time() < deadline and any(_alive(p) for p in ray_processes):
        time.sleep(0.2)
    assert not [p for p in ray_processes if _alive(p)]

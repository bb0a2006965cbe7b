"""The run directory's lock (evomerge/run_lock.py): real flocks, real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evomerge.run_lock import (
    LOCK,
    lock_holder,
    lock_run_dir,
    release_run_dir,
)
from evomerge.runstore import RunStore
from tests.study_factory import make_tiny_study

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
EVOMERGE = [sys.executable, "-m", "evomerge.cli"]


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=ENV, capture_output=True, text=True, timeout=60
    )


TRY_LOCK = """
import sys
from evomerge.run_lock import RunLockedError, lock_run_dir
try:
    lock_run_dir(sys.argv[1])
except RunLockedError as exc:
    print(exc)
    sys.exit(2)
print("locked")
"""


@pytest.fixture
def run_dir(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    yield path
    release_run_dir(path)


def test_a_second_process_is_refused_naming_the_holder(run_dir):
    lock_run_dir(run_dir)
    res = python(TRY_LOCK, str(run_dir))
    assert res.returncode == 2, res.stderr
    msg = res.stdout.strip()
    assert msg.startswith(f"{run_dir.resolve()} is being run by process {os.getpid()} on host ")
    assert socket.gethostname() in msg and "\n" not in msg
    release_run_dir(run_dir)
    assert python(TRY_LOCK, str(run_dir)).stdout.strip() == "locked"


def test_the_lock_of_a_killed_process_does_not_block(run_dir):
    """flock dies with its process: SIGKILL leaves the file, naming the dead pid, and no lock."""
    res = python(
        "import os, sys; from evomerge.run_lock import lock_run_dir; "
        "lock_run_dir(sys.argv[1]); print(os.getpid(), flush=True); os.kill(os.getpid(), 9)",
        str(run_dir),
    )
    assert res.returncode == -signal.SIGKILL
    dead = int(res.stdout)
    assert json.loads((run_dir / LOCK).read_text())["pid"] == dead
    assert lock_holder(run_dir) is None
    lock_run_dir(run_dir)
    assert json.loads((run_dir / LOCK).read_text())["pid"] == os.getpid()


def test_the_lock_is_reentrant_in_one_process_and_probed_without_taking_it(run_dir):
    assert lock_holder(run_dir) is None  # no lock file yet
    lock_run_dir(run_dir)
    lock_run_dir(run_dir)  # an in-process run, then resume, of the same run
    assert lock_holder(run_dir)["pid"] == os.getpid()
    release_run_dir(run_dir)
    assert lock_holder(run_dir) is None
    assert python(TRY_LOCK, str(run_dir)).stdout.strip() == "locked"  # the probe left it free


def test_a_forked_child_does_not_keep_the_lock(run_dir):
    """A helper forked by the controller (without exec) must not hold the run after it."""
    lock_run_dir(run_dir)
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only says it runs, then waits to be killed
        os.write(ready_w, b"x")  # the fork hooks ran before this line
        time.sleep(60)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        release_run_dir(run_dir)
        assert lock_holder(run_dir) is None
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(ready_r)
        os.close(ready_w)


def test_a_refused_locker_names_a_holder_that_has_not_written_its_name(run_dir):
    lock_run_dir(run_dir)
    (run_dir / LOCK).write_text("")
    res = python(TRY_LOCK, str(run_dir))
    assert res.returncode == 2 and "locked by another process" in res.stdout


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return make_tiny_study(tmp_path_factory.mktemp("lockstudy"))


def test_two_resumes_started_together_one_runs_the_other_is_refused(study, tmp_path):
    """Two real `evomerge resume` on one run dir: exactly one runs; the other exits 2 with one
    line naming the holder (host, pid) and changes nothing; the run ends with exactly the budget,
    one line per trial."""
    first = subprocess.run(
        [*EVOMERGE, "run", str(study), "--runs-dir", str(tmp_path), "--max-trials", "3", "--quiet"],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = tmp_path / "tiny"
    cmd = [*EVOMERGE, "resume", str(run_dir), "--max-trials", "24", "--quiet"]
    procs = [
        subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    err = outs[loser][1]
    assert err.count("\n") == 1 and err.startswith("evomerge: error: "), err
    assert f"is being run by process {procs[winner].pid} on host {socket.gethostname()}" in err
    store = RunStore(run_dir)
    assert [r.trial for r in store.read_trials()] == list(range(24))
    assert store.trials_path.read_text().count("\n") == 24  # lines too, not only distinct trials
    assert len({r.proposal for r in store.read_trials()}) == 24
    assert store.state()["state"] == "finished"
    status = subprocess.run(
        [*EVOMERGE, "status", str(run_dir), "--json"], env=ENV, capture_output=True, text=True
    )
    info = json.loads(status.stdout)
    assert info["trials_completed"] == 24 and info["budget"] == 24


def test_status_names_the_controller_while_it_runs_and_not_after_it_died(tmp_path, capsys):
    from evomerge.cli import main

    store = RunStore.create(tmp_path / "run", "name: tiny\nbudget: {max_trials: 4}\n")
    release_run_dir(store.dir)  # the controller is another process:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from evomerge.run_lock import lock_run_dir; "
            "from evomerge.runstore import RunStore; lock_run_dir(sys.argv[1]); "
            "RunStore(sys.argv[1]).set_state('running'); print('ready', flush=True); "
            "time.sleep(60)",
            str(store.dir),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        capsys.readouterr()
        assert main(["status", str(store.dir), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["state"] == "running"
        assert info["controller"] == {"host": socket.gethostname(), "pid": holder.pid}
    finally:
        holder.kill()
        holder.wait()
    assert main(["status", str(store.dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["state"] == "interrupted" and "controller" not in info

"""A full disk, for real: a small tmpfs mounted by the test and filled to ENOSPC.

What must hold: one line `evomerge: error: no space left on <mount> ...` and exit 75; trials.jsonl
whole lines only; the run interrupted and resumable, and with one worker and a fixed seed the
resumed run ends with the trials of an uninterrupted one; an export leaves nothing at --out.
Skipped (with the reason) where mounting a tmpfs is not permitted.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from evomerge.atomic import atomic_write
from evomerge.disk_full import disk_full_cause, full_disk_at, no_space
from evomerge.errors import EXIT_DISK_FULL, DiskFullError
from evomerge.runstore import RunStore, TrialRecord
from tests.study_factory import make_tiny_study, trial_sequence

EVOMERGE = [sys.executable, "-m", "evomerge.cli"]
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Callable[[str], Path]]:
    """mount(size) -> a fresh tmpfs of that size (e.g. "2m"); all unmounted at the end."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"tmpfs{len(mounted)}"
        mnt.mkdir()
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            pytest.skip(
                "a real full disk needs a tmpfs, and mounting one is not permitted here "
                f"(root or CAP_SYS_ADMIN): {res.stderr.strip() or res.returncode}"
            )
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path) -> Path:
    """Write zeros into mnt/filler until the filesystem refuses (ENOSPC)."""
    filler = mnt / "filler"
    chunk = b"\0" * 65536
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, chunk)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    # what is left is less than a page: fill the partial page too
    assert shutil.disk_usage(mnt).free < 65536
    return filler


def used(mnt: Path) -> int:
    return shutil.disk_usage(mnt).used


# -- the writers -------------------------------------------------------------------------------


def test_atomic_write_on_a_full_disk_keeps_the_old_file_and_names_the_path(tmpfs):
    mnt = tmpfs("1m")
    target = mnt / "state.json"
    atomic_write(target, "old\n")
    fill(mnt)
    with pytest.raises(DiskFullError) as info:
        atomic_write(target, "new" * 10000)
    msg = str(info.value)
    assert msg.startswith(f"no space left on {mnt} (") and str(target) in msg, msg
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert isinstance(info.value, OSError)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in mnt.iterdir()) == ["filler", "state.json"]  # no temp file left


def test_append_on_a_full_disk_leaves_whole_lines(tmpfs):
    mnt = tmpfs("1m")
    store = RunStore(mnt)
    rec = TrialRecord(trial=0, proposal=0, status="ok", genome={"x": 1.0}, recipe_hash="h")
    store.append(rec)
    (mnt / "filler").write_bytes(b"\0" * (shutil.disk_usage(mnt).free - 4096 - 100))
    big = TrialRecord(
        trial=1, proposal=1, status="failed", genome={}, recipe_hash="h2", error="e" * 20000
    )
    before = store.trials_path.read_bytes()
    with pytest.raises(DiskFullError) as info:
        store.append(big)  # part of it fits: the part written must be taken back
    assert str(store.trials_path) in str(info.value)
    assert store.trials_path.read_bytes() == before
    assert [r.trial for r in store.read_trials()] == [0]


def test_sqlite_full_is_recognized_under_its_wrappers(tmpfs):
    """SQLite's own error for a full disk (what Optuna's storage meets) carries no errno."""
    mnt = tmpfs("1m")
    db = sqlite3.connect(mnt / "x.db")
    db.execute("create table t (v blob)")
    db.commit()
    fill(mnt)
    with pytest.raises(sqlite3.OperationalError) as info:
        for _ in range(100):
            db.execute("insert into t values (?)", (b"\1" * 100000,))
            db.commit()
    db.close()
    assert disk_full_cause(info.value) is info.value
    try:  # wrapped, as SQLAlchemy and Optuna wrap it
        try:
            raise info.value
        except sqlite3.OperationalError as exc:
            raise RuntimeError("An exception is raised during the commit.") from exc
    except RuntimeError as wrapped:
        assert disk_full_cause(wrapped) is info.value
        err = no_space(mnt, disk_full_cause(wrapped), writing="the study's state")
        assert str(err).startswith(f"no space left on {mnt} (") and "study's state" in str(err)
    assert disk_full_cause(ValueError("no such table")) is None


def test_the_probe_tells_a_full_disk_from_a_damaged_database(tmpfs):
    """A WAL database on a full disk fails to open with SQLite's errno-less "disk I/O error"
    (no room for its -shm index); the probe write says the disk is full, not the file bad."""
    mnt = tmpfs("1m")
    db = sqlite3.connect(mnt / "x.db")
    db.execute("pragma journal_mode=wal")
    db.execute("create table t (v int)")
    db.commit()
    db.close()
    assert full_disk_at(mnt) is None
    fill(mnt)
    with pytest.raises(sqlite3.OperationalError) as info:
        sqlite3.connect(mnt / "x.db").execute("select * from t").fetchall()
    assert disk_full_cause(info.value) is None  # nothing in SQLite's error says "full"
    full = full_disk_at(mnt)
    assert full is not None and full.errno == errno.ENOSPC
    # the probe left nothing (SQLite's failed open leaves its empty -shm and -wal)
    assert {p.name for p in mnt.iterdir()} <= {"filler", "x.db", "x.db-shm", "x.db-wal"}


def test_a_quota_is_said_as_such():
    err = no_space("/x/y", OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), hint="free some")
    assert str(err) == "no space left on / (disk quota exceeded) while writing /x/y; free some"
    assert err.errno == errno.EDQUOT


# -- a study on a disk that fills up ------------------------------------------------------------


@pytest.fixture(scope="module")
def study_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("disk_full_study")
    make_tiny_study(root)
    return root


def study_file(root: Path, optimizer: dict, max_trials: int) -> Path:
    data = yaml.safe_load((root / "study.yaml").read_text())
    data["optimizer"] = optimizer
    data["budget"]["max_trials"] = max_trials
    # relative model and task paths resolve against the study file: keep it beside them
    path = root / f"full-{optimizer['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def fill_after(trials: Path, n: int, mnt: Path, proc: subprocess.Popen) -> threading.Thread:
    """A watcher that fills `mnt` once `trials` has n lines (while the study runs on)."""

    def watch() -> None:
        while proc.poll() is None:
            if trials.exists() and trials.read_bytes().count(b"\n") >= n:
                fill(mnt)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.parametrize(
    "optimizer",
    [{"name": "cma", "popsize": 4, "sigma0": 0.3}, {"name": "optuna_tpe", "n_startup_trials": 3}],
    ids=["cma", "optuna_tpe"],
)
def test_disk_full_mid_study_then_resume_equals_uninterrupted(
    study_root, tmp_path, tmpfs, optimizer
):
    study = study_file(study_root, optimizer, max_trials=60)
    whole = tmp_path / "whole"
    subprocess.run(
        [*EVOMERGE, "run", str(study), "--runs-dir", str(whole), "--name", "r", "--quiet"],
        check=True,
        env=ENV,
        capture_output=True,
    )
    mnt = tmpfs("2m")  # the run directory only; models and tasks stay on the real disk
    run_dir = mnt / "r"
    proc = subprocess.Popen(
        [*EVOMERGE, "run", str(study), "--runs-dir", str(mnt), "--name", "r", "--quiet"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    watcher = fill_after(run_dir / "trials.jsonl", 5, mnt, proc)
    _, err = proc.communicate(timeout=180)
    watcher.join(timeout=10)
    lines = err.strip().splitlines()
    assert proc.returncode == EXIT_DISK_FULL, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"evomerge: error: no space left on {mnt} ("), lines[0]
    assert f"evomerge resume {run_dir}" in lines[0]
    raw = (run_dir / "trials.jsonl").read_bytes()
    assert raw.endswith(b"\n") and all(json.loads(line) for line in raw.splitlines())
    store = RunStore(run_dir)
    done = len(store.read_trials())
    assert 5 <= done < 60  # stopped by the full disk, far from the budget
    assert f"{done} finished trials are on disk" in lines[0]
    if "state.json could not be updated" not in lines[0]:
        assert json.loads((run_dir / "state.json").read_text())["state"] == "interrupted"
    assert store.state()["state"] == "interrupted"

    # still full: resume says so in one line and changes nothing it cannot finish. Top the disk
    # up first: the stopped run's exit gives back what SQLite's write-ahead log held (up to its
    # 256 KiB journal_size_limit), which is free space the resume may rightly use.
    fill(mnt)
    res = subprocess.run(
        [*EVOMERGE, "resume", str(run_dir), "--quiet"], env=ENV, capture_output=True, text=True
    )
    assert res.returncode == EXIT_DISK_FULL, res.stderr[-3000:]
    assert res.stderr.strip().startswith(f"evomerge: error: no space left on {mnt}")
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr[-3000:]
    assert "--rebuild-state" not in res.stderr  # the state is whole: only the disk is full
    assert res.stderr.strip().endswith("; free space there and run the command again")
    assert len(store.read_trials()) == done

    (mnt / "filler").unlink()
    res = subprocess.run(
        [*EVOMERGE, "resume", str(run_dir), "--quiet"], env=ENV, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert trial_sequence(run_dir) == trial_sequence(whole / "r")
    assert store.state()["state"] == "finished"


# -- export and merge into a disk too small for the checkpoint ---------------------------------


@pytest.fixture(scope="module")
def finished_run(study_root, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("disk_full_runs")
    subprocess.run(
        [*EVOMERGE, "run", str(study_root / "study.yaml"), "--runs-dir", str(runs), "--quiet"],
        check=True,
        env=ENV,
        capture_output=True,
    )
    return runs / "tiny"


@pytest.mark.parametrize("command", ["export", "merge"])
def test_checkpoint_to_a_full_disk_is_one_line_and_leaves_nothing(finished_run, tmpfs, command):
    mnt = tmpfs("64k")  # the tiny checkpoint is about 90 kB
    out = mnt / "out"
    if command == "export":
        args = ["export", str(finished_run), "--out", str(out), "--no-report", "--quiet"]
    else:
        args = ["merge", str(finished_run / "best" / "recipe.yaml"), "--out", str(out)]
    res = subprocess.run([*EVOMERGE, *args], env=ENV, capture_output=True, text=True)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == EXIT_DISK_FULL, res.stderr[-3000:]
    assert len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith(f"evomerge: error: no space left on {mnt} ("), lines[0]
    assert f"the checkpoint to {out}" in lines[0] and "choose another --out" in lines[0]
    assert "(64.0 KiB free of 64.0 KiB)" in lines[0]  # given back before the message, not at exit
    assert list(mnt.iterdir()) == []  # no --out, no temp folder
    assert used(mnt) == 0  # and the space is given back


@pytest.mark.slow
def test_a_full_disk_under_a_library_write_is_one_line(tmpfs):
    """The zoo writes through transformers and safetensors, not evomerge's writers: the CLI
    still recognizes ENOSPC in what they raise and names --out."""
    mnt = tmpfs("256k")  # the small zoo's models take several times that
    res = subprocess.run(
        [*EVOMERGE, "zoo", "--out", str(mnt / "zoo"), "--small"],
        env=ENV,
        capture_output=True,
        text=True,
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == EXIT_DISK_FULL, res.stderr[-3000:]
    assert lines[-1].startswith(f"evomerge: error: no space left on {mnt} ("), lines[-1]
    assert f"while writing {mnt / 'zoo'}" in lines[-1]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]

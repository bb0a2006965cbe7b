"""`evomerge status RUN_DIR --watch`: the numbers it shows (throughput, ETA, busy shares) against
hand-computed ones on a synthetic trials.jsonl, the read-only follower of a run directory, and
the view itself in real processes: beside a real study (plain lines through a pipe) and on a
terminal (rich Live through a pty) until Ctrl-C."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from evomerge.run_metrics import (
    RunFollower,
    budget_lines,
    busy_in,
    eta,
    evaluation_intervals,
    throughput,
)
from evomerge.runstore import RunStore, TrialRecord, best_trial
from evomerge.status_view import duration, make_frame, plain_line, render
from tests.study_factory import make_tiny_study

EVOMERGE = [sys.executable, "-m", "evomerge.cli"]
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def rec(trial, proposal, worker, start, total, *, status="ok", fit=0.5, items=10, **kw):
    """A line whose evaluation ran on `worker` over [start, start + total], appended at its end."""
    return TrialRecord(
        trial=trial,
        proposal=proposal,
        status=status,
        genome={},
        recipe_hash=f"h{proposal}",
        fitness=None if status == "failed" else [fit],
        scores={} if status == "failed" else {"t": {"acc": fit}},
        error="boom: out of luck" if status == "failed" else None,
        seconds={"total": total},
        worker=worker,
        finished_at=kw.pop("finished", start + total),
        started_at=start,
        items=items,
        **kw,
    )


def synthetic() -> list[TrialRecord]:
    """Workers A and B from t=100 to 120, a duplicate, then (a resume) C racing one candidate
    over two rungs from 200 to 210."""
    return [
        rec(0, 1, "B", 101, 8),
        rec(1, 0, "A", 100, 10, fit=0.6),
        rec(2, 2, "A", 112, 8, fit=0.7),
        rec(3, 3, "B", 115, 5, status="failed"),
        TrialRecord(4, 4, "duplicate", {}, "h2", fitness=[0.7], duplicate_of=2, finished_at=121),
        rec(5, 5, "C", 200, 5, items=4, rung=0, fidelity=0.3, fit=0.9),
        rec(6, 5, "C", 205, 5, items=8, rung=1, fidelity=1.0, fit=0.75),
    ]


def from_file(tmp_path: Path) -> list[TrialRecord]:
    """The synthetic lines written to a trials.jsonl and read back as any run's are."""
    return RunStore(write_run(tmp_path / "syn", synthetic(), {"state": "finished"})).read_trials()


def test_throughput_over_a_window_counts_each_candidate_once(tmp_path):
    recs = from_file(tmp_path)
    assert recs == synthetic()  # started_at and the rest survive the file
    tp = throughput(recs, end=210, window=100)
    # window (110, 210]: first lines of proposals 2, 3, 4 (duplicate) and 5 (its two rungs once)
    assert (tp.start, tp.end, tp.candidates, tp.evaluations, tp.items) == (110, 210, 4, 4, 32)
    assert tp.workers == 3  # A and B overlap (110, 120], C the rest; A's [100, 110] does not
    assert tp.per_minute == pytest.approx(4 / 100 * 60)
    assert tp.per_worker == pytest.approx(0.8)
    assert tp.items_per_second == pytest.approx(0.32)
    # the session began at 150: the stopped time before it is no part of the rate
    tp = throughput(recs, end=210, window=100, since=150)
    assert (tp.start, tp.candidates, tp.workers, tp.items) == (150, 1, 1, 12)
    assert tp.per_minute == pytest.approx(1.0)
    # a window longer than the run starts at its first evaluation (t=100)
    tp = throughput(recs, end=210, window=1000)
    assert (tp.start, tp.candidates) == (100, 6)
    assert throughput(recs, end=100, window=10) is None and throughput([], end=1) is None


def test_budgets_and_eta_from_the_rate(tmp_path):
    recs = from_file(tmp_path)
    tp = throughput(recs, end=210, window=100)
    budget = {"max_trials": 10, "max_items": 100, "max_seconds": 300}
    lines = {b.what: b for b in budget_lines(recs, budget, tp, elapsed=120)}
    assert (lines["trials"].used, lines["trials"].limit) == (6, 10)
    assert lines["trials"].eta == pytest.approx(4 / (2.4 / 60))  # 100 s
    assert lines["items"].used == 52 and lines["items"].eta == pytest.approx(48 / 0.32)  # 150 s
    assert lines["seconds"].eta == pytest.approx(180)
    assert eta(list(lines.values())) == pytest.approx(100)  # the trials budget ends it first
    # no rate yet, no session time: no ETA, and no seconds line
    lines = budget_lines(recs, budget, None)
    assert [b.what for b in lines] == ["trials", "items"] and eta(lines) is None
    assert budget_lines(recs, {"max_trials": 6}, tp)[0].eta == 0.0  # done already


def test_busy_share_in_a_window_and_old_lines_without_a_start_time(tmp_path):
    ivs = evaluation_intervals(from_file(tmp_path))
    assert [(iv.worker, iv.start, iv.end) for iv in ivs][:2] == [("B", 101, 109), ("A", 100, 110)]
    assert len(ivs) == 6  # the duplicate occupies no worker
    assert busy_in(ivs, 110, 120) == pytest.approx({"A": 0.8, "B": 0.5})
    assert busy_in(ivs, 100, 210)["C"] == pytest.approx(10 / 110)
    old = rec(0, 0, "A", 0, 10, finished=110.0)  # a line from before started_at was recorded
    (iv,) = evaluation_intervals([old])
    assert (iv.start, iv.end) == (100, 110)
    assert duration(45) == "45s" and duration(384) == "6m24s" and duration(7500) == "2h05m"


def write_run(root: Path, recs: list[TrialRecord], state: dict, torn: bytes = b"") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.yaml").write_text(
        yaml.safe_dump({"name": "syn", "budget": {"max_trials": 10, "max_seconds": 3600}})
    )
    (root / "trials.jsonl").write_bytes(b"".join(r.to_json().encode() + b"\n" for r in recs) + torn)
    (root / "state.json").write_text(json.dumps(state))
    return root


def test_follower_reads_new_whole_lines_only_and_writes_nothing(tmp_path):
    recs = synthetic()
    line = recs[2].to_json().encode() + b"\n"
    run = write_run(
        tmp_path / "r", recs[:2], {"state": "running", "pid": os.getpid(), "updated": 99}, line[:17]
    )
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir())
    follower = RunFollower(run)
    snap = follower.poll()
    assert [r.trial for r in snap.records] == [0, 1]  # the half-written line waits
    assert snap.state == "running" and snap.session_start == 99 and snap.name == "syn"
    with open(run / "trials.jsonl", "ab") as fh:
        fh.write(
            line[17:] + recs[3].to_json().encode() + b"\n" + recs[1].to_json().encode() + b"\n"
        )
    assert [r.trial for r in follower.poll().records] == [0, 1, 2, 3]  # trial 1 again: once
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir() if p.name != "trials.jsonl") == [
        b for b in before if b[0] != "trials.jsonl"
    ]  # fmt: skip
    assert not (run / ".lock").exists()  # it never locks (the lock file is not even created)
    # the run started over (a new trials.jsonl): read afresh
    tmp = run / "t.tmp"
    tmp.write_bytes(recs[4].to_json().encode() + b"\n")
    os.replace(tmp, run / "trials.jsonl")
    assert [r.trial for r in follower.poll().records] == [4]


def test_state_of_a_controller_killed_on_this_host_reads_interrupted(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = write_run(
        tmp_path / "r", synthetic(), {"state": "running", "pid": dead.pid, "updated": 1}
    )
    (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    assert RunFollower(run).poll().state == "interrupted"
    (run / ".lock").write_text(json.dumps({"host": "another-host", "pid": dead.pid}))
    snap = RunFollower(run).poll()  # another host's pid cannot be checked from here: believed
    assert snap.state == "running" and snap.controller == {"host": "another-host", "pid": dead.pid}
    (run / "state.json").write_text(json.dumps({"state": "finished", "stopped_by": "time"}))
    assert RunFollower(run).poll().state == "finished"


def test_frame_renders_budgets_best_workers_failures_and_last_candidates(tmp_path):
    from rich.console import Console

    state = {"state": "running", "pid": os.getpid(), "updated": time.time() - 30}
    snap = RunFollower(write_run(tmp_path / "r", synthetic(), state)).poll()
    frame = make_frame(snap)
    assert frame.best.trial == 6 and frame.done == 6 and len(frame.failed) == 1
    console = Console(record=True, width=120, force_terminal=False)
    console.print(render(frame))
    text = console.export_text()
    for part in (
        "6/10 trials",
        "best: trial 6, fitness 0.7500",
        "t ",
        "acc=0.7500",
        "1 failed; last, trial 3: boom: out of luck",
        "0.30 (rung 0)",
        "of this session",
    ):
        assert part in text, (part, text)
    line = plain_line(frame)
    assert "syn running: 6/10 trials" in line and "best 0.7500 (trial 6)" in line
    assert "1 failed" in line and "candidates/min" in line and "eta " in line


def test_watch_beside_a_real_study_shows_the_count_growing_and_the_final_best(tmp_path):
    study = make_tiny_study(tmp_path / "s", max_trials=100)
    runs = tmp_path / "runs"
    proc = subprocess.Popen(
        [*EVOMERGE, "run", str(study), "--runs-dir", str(runs), "--name", "r", "--quiet"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # the view starts while the study sets up (its run directory exists from the start)
        t0 = time.time()
        while not (runs / "r" / "study.yaml").exists() and proc.poll() is None:
            assert time.time() - t0 < 120, "the study never created its run directory"
            time.sleep(0.05)
        watch = subprocess.run(
            [*EVOMERGE, "status", str(runs / "r"), "--watch", "--interval", "0.25"],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
    finally:
        proc.kill()
    assert watch.returncode == 0, watch.stderr
    counts = [int(n) for n in re.findall(r" (\d+)/100 trials", watch.stdout)]
    # a line whenever the count changed: growing while the study ran, 100 at the end
    assert len(counts) >= 3 and counts == sorted(set(counts)) and counts[0] < 100 == counts[-1]
    assert "candidates/min" in watch.stdout and "eta " in watch.stdout
    best = best_trial(RunStore(runs / "r").read_trials())
    last = watch.stdout.splitlines()[-1]
    assert last == (
        f"study r finished (stopped by budget): 100 trials, 0 failed, "
        f"best {best.fitness[0]:.4f} (trial {best.trial})"
    )


def test_watch_on_a_terminal_redraws_live_and_ends_on_ctrl_c(tmp_path):
    state = {"state": "running", "pid": os.getpid(), "updated": time.time()}
    run = write_run(tmp_path / "r", synthetic(), state)
    master, slave = pty.openpty()
    env = {**ENV, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    proc = subprocess.Popen(
        [*EVOMERGE, "status", str(run), "--watch", "--interval", "0.2"],
        env=env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    out = b""

    def read_until(done, timeout: float) -> None:
        nonlocal out
        t0 = time.time()
        while not done() and time.time() - t0 < timeout:
            try:
                out += os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break

    try:
        read_until(lambda: out.count(b"6/10 trials") >= 2, 60)  # drawn, then redrawn
        proc.send_signal(signal.SIGINT)
        read_until(lambda: proc.poll() is not None and b"stopped watching" in out, 30)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        os.close(master)
    text = out.decode(errors="replace")
    assert "\x1b[" in text and "best: trial 6" in text  # rich's cursor moves: a live redraw
    assert "stopped watching (the study goes on)" in text and "Traceback" not in text


def test_many_workers_fold_into_one_line_of_busy_shares(tmp_path):
    from rich.console import Console

    from evomerge.run_metrics import Snapshot

    # worker k busy over [100, 101 + k]; the run finished at 110: shares (1 + k) / 10
    recs = [rec(k, k, f"w{k}", 100, 1 + k) for k in range(10)]
    snap = Snapshot(tmp_path, {"name": "big"}, "finished", {"state": "finished"}, None, recs, 120)
    console = Console(record=True, width=120)
    console.print(render(make_frame(snap)))
    text = console.export_text()
    assert "10 workers seen, 10 in the last 10s: busy min 10%, median 60%, max 100%" in text
    assert not [ln for ln in text.splitlines() if ln.startswith("w")]  # no per-worker table


def test_watch_refuses_json_and_a_missing_run_dir(tmp_path, capsys):
    from evomerge.cli import main

    write_run(tmp_path / "r", synthetic(), {"state": "finished"})
    assert main(["status", str(tmp_path / "r"), "--watch", "--json"]) == 2
    assert main(["status", str(tmp_path / "nope"), "--watch"]) == 2
    assert main(["status", str(tmp_path / "r"), "--watch", "--interval", "0"]) == 2
    err = capsys.readouterr().err
    assert "pick one" in err and "does not exist" in err and "must be positive" in err


def test_watch_imports_no_torch_ray_or_matplotlib(tmp_path):
    """A view on a laptop beside a study on a cluster stays light: nothing heavy is imported."""
    run = write_run(tmp_path / "r", synthetic(), {"state": "finished"})
    code = (
        "import sys; from evomerge.cli import main; code = main(['status', sys.argv[1], '--watch']);"
        "heavy = [m for m in ('torch', 'ray', 'lm_eval', 'matplotlib', 'optuna') if m in sys.modules];"
        "print('heavy', heavy); sys.exit(code)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(run)], env=ENV, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert "heavy []" in res.stdout and "study syn finished" in res.stdout

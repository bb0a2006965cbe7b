"""`evomerge status RUN_DIR --watch`: a live view of a study that another process runs.

Each refresh reads the run directory (evomerge.run_metrics.RunFollower: read only, no lock, only
the new lines of trials.jsonl) and draws a `Frame`: budgets and ETA, the best so far with its
per-task scores, throughput and each worker's busy share over the recent window, failures and
the last candidates. On a terminal the frame is redrawn in place (rich Live); elsewhere (a pipe,
a log file) it is one plain line whenever something changed, and at least every minute. The
view ends, exit 0, on Ctrl-C and once the study has finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.run_metrics import (
    WINDOW,
    BudgetLine,
    RunFollower,
    Snapshot,
    Throughput,
    budget_lines,
    busy_in,
    eta,
    evaluation_intervals,
    throughput,
)
from evomerge.runstore import TrialRecord, best_trial

LAST = 6  # candidates listed
HEARTBEAT = 60.0  # seconds between plain lines when nothing changes
MAX_WORKER_ROWS = 8  # more workers: one line with the spread of their busy shares


@dataclass(frozen=True)
class Frame:
    """What one refresh shows, computed from a snapshot."""

    snap: Snapshot
    rate: Throughput | None
    budgets: list[BudgetLine]
    eta: float | None
    best: TrialRecord | None
    failed: list[TrialRecord]
    last: list[TrialRecord]
    busy: dict[str, float]  # worker -> busy fraction over the rate's window
    evaluations: dict[str, int]  # worker -> evaluations in the whole run

    @property
    def done(self) -> int:
        return next((int(b.used) for b in self.budgets if b.what == "trials"), 0)

    @property
    def rate_seconds(self) -> float | None:
        return self.rate.seconds if self.rate is not None else None

    @property
    def last_seen(self) -> float | None:
        """Seconds since the last line was recorded (this host's clock against the controller's)."""
        times = [r.finished_at for r in self.snap.records if r.finished_at > 0]
        return max(self.snap.read_at - max(times), 0.0) if times else None


def make_frame(snap: Snapshot, window: float = WINDOW) -> Frame:
    records = snap.records
    last_time = max((r.finished_at for r in records), default=0.0)
    running = snap.state == "running"
    end = max(snap.read_at, last_time) if running else (last_time or snap.read_at)
    rate = throughput(records, end, window, since=snap.session_start)
    start = snap.session_start
    elapsed = snap.read_at - start if start is not None else None
    rate_now = rate if running else None
    budgets = budget_lines(records, snap.budget, rate_now, elapsed, snap.parent_items)
    ivs = evaluation_intervals(records)
    evaluations: dict[str, int] = {}
    for iv in ivs:
        evaluations[iv.worker] = evaluations.get(iv.worker, 0) + 1
    return Frame(
        snap=snap,
        rate=rate,
        budgets=budgets,
        eta=eta(budgets) if running else None,
        best=best_trial(records),
        failed=[r for r in records if r.status == "failed"],
        last=records[-LAST:][::-1],
        busy=busy_in(ivs, rate.start, rate.end) if rate is not None else {},
        evaluations=evaluations,
    )


def duration(seconds: float | None) -> str:
    """'45s', '6m24s', '2h05m'; '-' when unknown."""
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _fitness(rec: TrialRecord | None) -> str:
    if rec is None or not rec.fitness:
        return "-"
    return ", ".join(f"{v:.4f}" for v in rec.fitness)


def _state(frame: Frame) -> str:
    snap = frame.snap
    who = snap.controller
    if snap.state == "running" and who and who.get("pid"):
        return f"running (process {who['pid']} on {who.get('host') or '?'})"
    if snap.state == "finished":
        return f"finished (stopped by {snap.state_info.get('stopped_by', 'budget')})"
    if snap.state == "interrupted":
        return f"interrupted (continue with: evomerge resume {snap.run_dir})"
    return snap.state


def _budget(b: BudgetLine) -> str:
    if b.what == "seconds":
        return f"{duration(b.used)}/{duration(b.limit)} of this session"
    return f"{int(b.used)}/{int(b.limit)} {b.what}"


def _rate(rate: Throughput | None) -> str:
    if rate is None:
        return "no rate yet"
    per = rate.per_worker
    per_s = f"{per:.1f}/min per worker, " if per is not None else ""
    return (
        f"{rate.per_minute:.1f} candidates/min ({per_s}{rate.workers} worker"
        f"{'s' if rate.workers != 1 else ''}, last {duration(rate.seconds)})"
    )


def plain_line(frame: Frame) -> str:
    """One line for logs: time, state, budgets, best, failures, throughput, ETA."""
    best = frame.best
    best_s = f"best {_fitness(best)} (trial {best.trial})" if best else "no successful trial yet"
    parts = [
        ", ".join(_budget(b) for b in frame.budgets) or f"{frame.done} trials",
        best_s,
        f"{len(frame.failed)} failed",
        _rate(frame.rate),
    ]
    if frame.snap.state == "running":
        parts.append(f"eta {duration(frame.eta)}")
    stamp = time.strftime("%H:%M:%S", time.localtime(frame.snap.read_at))
    return f"[{stamp}] {frame.snap.name} {frame.snap.state}: " + ", ".join(parts)


def render(frame: Frame) -> Any:
    """The frame as a rich renderable: compact tables that fit a terminal of ~30 lines."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def table(*cols: str) -> Table:
        t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1))
        for c in cols:
            t.add_column(c)
        return t

    snap = frame.snap
    seen = frame.last_seen
    head = Text.assemble(
        (snap.name, "bold"),
        f"  {_state(frame)}",
        f"  last trial {duration(seen)} ago" if seen is not None else "  no trial yet",
    )
    progress = Table.grid(padding=(0, 2))
    for b in frame.budgets:
        share = f"{100 * b.used / b.limit:.0f}%" if b.limit else ""
        ends = f"runs out in {duration(b.eta)}" if snap.state == "running" else ""
        progress.add_row(b.what, _budget(b), share, ends)
    progress.add_row("rate", _rate(frame.rate), "", f"eta {duration(frame.eta)}")
    parts: list[Any] = [head, progress]
    best = frame.best
    if best is None:
        parts.append(Text("no successful trial yet"))
    else:
        scores = Table.grid(padding=(0, 2))
        scores.add_row(Text(f"best: trial {best.trial}, fitness {_fitness(best)}", "bold"), "")
        for task, metrics in best.scores.items():
            scores.add_row(f"  {task}", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        parts.append(scores)
    if len(frame.evaluations) > MAX_WORKER_ROWS:  # a big cluster: the spread, in one line
        shares = sorted(frame.busy.values())
        recent = f"{len(shares)} in the last {duration(frame.rate_seconds)}"
        if shares:
            recent += (
                f": busy min {100 * shares[0]:.0f}%, median {100 * shares[len(shares) // 2]:.0f}%,"
                f" max {100 * shares[-1]:.0f}%"
            )
        parts.append(Text(f"{len(frame.evaluations)} workers seen, {recent}"))
    elif frame.evaluations:
        workers = table("worker", "evaluations", f"busy (last {duration(frame.rate_seconds)})")
        for w, n in frame.evaluations.items():
            busy = frame.busy.get(w)
            workers.add_row(w, str(n), f"{100 * busy:.0f}%" if busy is not None else "-")
        parts.append(workers)
    last = table("trial", "candidate", "status", "fitness", "fidelity", "worker", "seconds")
    for r in frame.last:
        last.add_row(
            str(r.trial),
            str(r.proposal),
            r.status,
            _fitness(r),
            f"{r.fidelity:.2f}" + (f" (rung {r.rung})" if r.rung is not None else ""),
            r.worker or "-",
            f"{r.seconds.get('total', 0.0):.2f}",
        )
    parts.append(last)
    if frame.failed:
        bad = frame.failed[-1]
        error = (bad.error or "").splitlines()[0][:200] if bad.error else "no error recorded"
        parts.append(Text(f"{len(frame.failed)} failed; last, trial {bad.trial}: {error}", "red"))
    else:
        parts.append(Text("no failures"))
    return Group(*parts)


def final_line(frame: Frame) -> str:
    best = frame.best
    best_s = f"best {_fitness(best)} (trial {best.trial})" if best else "no successful trial"
    return (
        f"study {frame.snap.name} {_state(frame)}: {frame.done} trials, "
        f"{len(frame.failed)} failed, {best_s}"
    )


def watch(
    run_dir: str | Path,
    *,
    interval: float = 2.0,
    window: float = WINDOW,
    console: Any = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Redraw until the study finishes or Ctrl-C; returns the exit code (0)."""
    from rich.console import Console

    console = console or Console()
    follower = RunFollower(run_dir)
    try:
        if console.is_terminal:
            return _watch_live(follower, console, interval, window, sleep)
        return _watch_plain(follower, console, interval, window, sleep)
    except KeyboardInterrupt:
        console.print("stopped watching (the study goes on)", highlight=False)
        return 0


def _watch_live(
    follower: RunFollower, console: Any, interval: float, window: float, sleep: Callable
) -> int:
    from rich.live import Live

    frame = make_frame(follower.poll(), window)
    with Live(render(frame), console=console, auto_refresh=False, transient=False) as live:
        while frame.snap.state != "finished":
            sleep(interval)
            frame = make_frame(follower.poll(), window)
            live.update(render(frame), refresh=True)
    console.print(final_line(frame), highlight=False)
    return 0


def _watch_plain(
    follower: RunFollower, console: Any, interval: float, window: float, sleep: Callable
) -> int:
    shown: tuple | None = None
    shown_at = 0.0
    while True:
        frame = make_frame(follower.poll(), window)
        key = (len(frame.snap.records), frame.snap.state)
        if key != shown or time.monotonic() - shown_at >= HEARTBEAT:
            print(plain_line(frame), file=console.file, flush=True)
            shown, shown_at = key, time.monotonic()
        if frame.snap.state == "finished":
            print(final_line(frame), file=console.file, flush=True)
            return 0
        sleep(interval)

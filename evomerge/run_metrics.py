"""What a run's records say about its progress: throughput, ETA, when each worker was busy.

Pure functions over TrialRecords, shared by the live view (`evomerge status --watch`,
evomerge/status_view.py) and the report's plots (evomerge/plots.py), plus `RunFollower`, which
reads a run directory that another process, maybe on another host, is writing.

Times. `finished_at` is the controller's clock when it appended the line; `started_at` the
worker's clock when it began the evaluation, which then took `seconds["total"]`. A worker's busy
interval is [started_at, started_at + total]; lines written before `started_at` was recorded
(older runs) get [finished_at - total, finished_at], which also counts the time the result took
to reach the controller. Duplicates are not evaluations: they occupy no worker.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.runstore import (
    STATE,
    STUDY,
    TRIALS,
    RunStore,
    TrialRecord,
    _parse_trial,
    _pid_alive,
    candidates_done,
    parent_items,
)

#: the recent window throughput is measured over (seconds)
WINDOW = 300.0


@dataclass(frozen=True)
class Interval:
    """One evaluation on one worker."""

    worker: str
    trial: int
    start: float
    end: float
    ok: bool


def evaluation_intervals(records: Sequence[TrialRecord]) -> list[Interval]:
    """The busy interval of every evaluation that names its worker, in record order."""
    out = []
    for r in records:
        if r.status == "duplicate" or not r.worker:
            continue
        total = max(float(r.seconds.get("total", 0.0)), 0.0)
        if r.started_at > 0:
            start, end = r.started_at, r.started_at + total
        elif r.finished_at > 0:
            start, end = r.finished_at - total, r.finished_at
        else:
            continue
        out.append(Interval(r.worker, r.trial, start, end, r.status == "ok" and r.ok))
    return out


def _union(spans: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


@dataclass(frozen=True)
class Utilization:
    """How busy the workers were. A session is a stretch of time in which workers ran without a
    break in the run (a resume after a stop starts a new one; the gap between counts for
    nobody); each worker is available for the whole of its session, from the session's first
    evaluation to its last, so the idle time at a generation's end and while others finish the
    last candidates counts as idle."""

    workers: tuple[str, ...]  # in the order of their first evaluation
    busy: dict[str, float]  # seconds each worker evaluated
    available: dict[str, float]  # seconds of each worker's session
    sessions: tuple[tuple[float, float], ...]

    @property
    def fraction(self) -> float:
        total = sum(self.available.values())
        return sum(self.busy.values()) / total if total > 0 else 1.0

    def of(self, worker: str) -> float:
        avail = self.available[worker]
        return self.busy[worker] / avail if avail > 0 else 1.0


def utilization(intervals: Sequence[Interval]) -> Utilization | None:
    """Busy time over available time per worker and overall; None without any interval."""
    if not intervals:
        return None
    spans: dict[str, list[tuple[float, float]]] = {}
    for iv in sorted(intervals, key=lambda iv: iv.start):
        spans.setdefault(iv.worker, []).append((iv.start, iv.end))
    life = {w: (min(a for a, _ in s), max(b for _, b in s)) for w, s in spans.items()}
    sessions = _union(list(life.values()))
    available = {}
    for w, (a, _) in life.items():
        lo, hi = next(s for s in sessions if s[0] <= a <= s[1])
        available[w] = hi - lo
    busy = {w: sum(b - a for a, b in _union(s)) for w, s in spans.items()}
    return Utilization(tuple(spans), busy, available, tuple(sessions))


def busy_in(intervals: Sequence[Interval], start: float, end: float) -> dict[str, float]:
    """Per worker, the fraction of [start, end] it spent evaluating (workers seen in it only)."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for iv in intervals:
        if iv.end > start and iv.start < end:
            spans.setdefault(iv.worker, []).append((max(iv.start, start), min(iv.end, end)))
    span = end - start
    return {
        w: sum(b - a for a, b in _union(s)) / span if span > 0 else 0.0 for w, s in spans.items()
    }


@dataclass(frozen=True)
class Throughput:
    """Candidates recorded and items scored per unit of time over [start, end]."""

    start: float
    end: float
    candidates: int  # candidates whose first line was recorded in (start, end]
    evaluations: int  # lines of evaluations (racing: one per rung) in (start, end]
    items: int  # fitness items scored by those evaluations
    workers: int  # workers with an evaluation that overlaps the window

    @property
    def seconds(self) -> float:
        return self.end - self.start

    @property
    def per_minute(self) -> float:
        """Candidates per minute, all workers together."""
        return 60.0 * self.candidates / self.seconds

    @property
    def per_worker(self) -> float | None:
        """Candidates per minute per worker."""
        return self.per_minute / self.workers if self.workers else None

    @property
    def items_per_second(self) -> float:
        return self.items / self.seconds


def throughput(
    records: Sequence[TrialRecord],
    end: float,
    window: float = WINDOW,
    since: float | None = None,
) -> Throughput | None:
    """Throughput over the last `window` seconds before `end`, starting no earlier than the
    run's first evaluation nor than `since` (when the running session began: time before it,
    while the run was stopped, is no part of its rate). None when that leaves no time."""
    ivs = evaluation_intervals(records)
    times = [iv.start for iv in ivs] + [r.finished_at for r in records if r.finished_at > 0]
    if not times:
        return None
    first = min(times)
    start = max(end - window, first, since if since is not None else first)
    if end - start <= 0:
        return None
    first_line: dict[int, TrialRecord] = {}
    for r in records:
        first_line.setdefault(r.proposal, r)
    fresh = [r for r in first_line.values() if start < r.finished_at <= end]
    recent = [r for r in records if start < r.finished_at <= end and r.status != "duplicate"]
    workers = {iv.worker for iv in ivs if iv.end > start and iv.start <= end}
    return Throughput(
        start=start,
        end=end,
        candidates=len(fresh),
        evaluations=len(recent),
        items=sum(r.items for r in recent),
        workers=len(workers),
    )


@dataclass(frozen=True)
class BudgetLine:
    """One budget of the study: what is used of it, and when it runs out at the current rate."""

    what: str  # trials | items | seconds
    used: float
    limit: float
    eta: float | None  # seconds until used reaches limit; None: no rate to tell


def budget_lines(
    records: Sequence[TrialRecord],
    budget: Mapping[str, Any],
    rate: Throughput | None,
    elapsed: float | None = None,
    parent_items: int = 0,
) -> list[BudgetLine]:
    """The budgets the study sets (budget.max_trials, max_items, max_seconds: the latter only
    with `elapsed`, the seconds of the running session, since it limits one run or resume).
    `parent_items`: the items of the parents' rows (evomerge/parents.py), in max_items too."""
    out = []
    if budget.get("max_trials"):
        done, limit = candidates_done(records), budget["max_trials"]
        per_s = rate.per_minute / 60 if rate is not None else 0.0
        out.append(BudgetLine("trials", done, limit, _eta(limit - done, per_s)))
    if budget.get("max_items"):
        used, limit = sum(r.items for r in records) + parent_items, budget["max_items"]
        per_s = rate.items_per_second if rate is not None else 0.0
        out.append(BudgetLine("items", used, limit, _eta(limit - used, per_s)))
    if budget.get("max_seconds") and elapsed is not None:
        limit = float(budget["max_seconds"])
        out.append(BudgetLine("seconds", elapsed, limit, max(limit - elapsed, 0.0)))
    return out


def _eta(left: float, per_second: float) -> float | None:
    if left <= 0:
        return 0.0
    return left / per_second if per_second > 0 else None


def eta(lines: Sequence[BudgetLine]) -> float | None:
    """When the first budget runs out (the study stops there)."""
    known = [b.eta for b in lines if b.eta is not None]
    return min(known) if known else None


# ---------------------------------------------------------------------------- reading a run


@dataclass(frozen=True)
class Snapshot:
    """A run directory as read at `read_at` (this host's clock)."""

    run_dir: Path
    study: dict[str, Any]
    state: str  # running | interrupted | finished | starting
    state_info: dict[str, Any]
    controller: dict[str, Any] | None  # {host, pid} of the process that runs it
    records: list[TrialRecord] = field(default_factory=list)
    read_at: float = 0.0
    parent_items: int = 0  # items of the parents' rows (racing with irt), in budget.max_items

    @property
    def name(self) -> str:
        return str(self.study.get("name", self.run_dir.name))

    @property
    def budget(self) -> dict[str, Any]:
        return dict(self.study.get("budget") or {})

    @property
    def session_start(self) -> float | None:
        """When the running session began: state.json is written 'running' at its start."""
        updated = self.state_info.get("updated")
        return float(updated) if self.state == "running" and updated is not None else None


class RunFollower:
    """Reads a run directory that another process is writing, perhaps on another host through a
    shared file system: never locks it (not even the probe `evomerge status` makes) and never
    writes. trials.jsonl is read incrementally, up to its last whole line (a line being
    appended is read once it is complete); a new file (the run started over) is read afresh."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = RunStore.open(run_dir).dir  # RunDirError when it is not a run directory
        self._records: list[TrialRecord] = []
        self._seen: set[int] = set()
        self._offset = 0
        self._lines = 0
        self._inode: int | None = None
        self._study: dict[str, Any] = {}
        self._study_mtime: float | None = None

    def poll(self) -> Snapshot:
        # state before trials: a state read as finished then comes with every trial of the run
        info = _read_json(self.dir / STATE)
        self._read_trials()
        controller = _read_json(self.dir / ".lock") if info.get("state") == "running" else {}
        return Snapshot(
            run_dir=self.dir,
            study=self._read_study(),
            state=_infer_state(info, controller),
            state_info=info,
            controller={"host": controller.get("host"), "pid": info.get("pid")}
            if info.get("state") == "running"
            else None,
            records=list(self._records),
            read_at=time.time(),
            parent_items=parent_items(self.dir),
        )

    def _read_study(self) -> dict[str, Any]:
        """study.yaml, read again when it changes (resume --max-trials rewrites the budget)."""
        from evomerge.yaml_io import read_yaml

        path = self.dir / STUDY
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return self._study
        if mtime != self._study_mtime:
            data = read_yaml(path)
            self._study = data if isinstance(data, dict) else {}
            self._study_mtime = mtime
        return self._study

    def _read_trials(self) -> None:
        path = self.dir / TRIALS
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if st is None or st.st_ino != self._inode or st.st_size < self._offset:
            self._records, self._seen, self._offset, self._lines = [], set(), 0, 0
            self._inode = st.st_ino if st is not None else None
        if st is None or st.st_size == self._offset:
            return
        with open(path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read(st.st_size - self._offset)
        whole = data[: data.rfind(b"\n") + 1]  # a torn or half-written last line waits
        for line in whole.splitlines(keepends=True):
            self._lines += 1
            if line.strip():
                rec = _parse_trial(line, path, self._lines)
                if rec.trial not in self._seen:
                    self._seen.add(rec.trial)
                    self._records.append(rec)
        self._offset += len(whole)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _infer_state(info: Mapping[str, Any], lock: Mapping[str, Any]) -> str:
    """state.json's state; "running" is doubted only where it can be checked without the lock:
    a controller on this host whose pid is gone was killed (SIGKILL, OOM) mid-run."""
    state = str(info.get("state", "starting"))
    here = lock.get("host") == socket.gethostname()
    if state == "running" and here and not _pid_alive(int(info.get("pid", -1))):
        return "interrupted"
    return state

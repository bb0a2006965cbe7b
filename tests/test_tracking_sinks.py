"""The sink dispatcher (evomerge.tracking.Tracking): a failing sink is reported once and turned
off, a slow one never holds the loop, and each trial comes with the best so far."""

from __future__ import annotations

import logging
import time

from evomerge.runstore import TrialRecord
from evomerge.tracking import Tracking


def rec(trial: int, fitness: float | None, fidelity: float = 1.0) -> TrialRecord:
    return TrialRecord(
        trial=trial,
        proposal=trial,
        status="ok" if fitness is not None else "failed",
        genome={"x": 0.5},
        recipe_hash=f"h{trial}",
        fitness=[fitness] if fitness is not None else None,
        fidelity=fidelity,
    )


class Recorder:
    def __init__(self, name: str, *, fail_on: int | None = None, delay: float = 0.0):
        self.name, self.fix = name, f"the {name} settings"
        self.fail_on, self.delay = fail_on, delay
        self.started: list[int] = []
        self.seen: list[tuple[int, int | None]] = []
        self.closed = 0

    def start(self, records):
        self.started = [r.trial for r in records]

    def trial(self, record, best):
        time.sleep(self.delay)
        if record.trial == self.fail_on:
            raise ConnectionError(f"{self.name} is unreachable\nsecond line")
        self.seen.append((record.trial, best.trial if best else None))

    def close(self):
        self.closed += 1


def test_a_failing_sink_warns_once_and_the_others_go_on(caplog):
    caplog.set_level(logging.WARNING, logger="evomerge.tracking")
    bad, good = Recorder("bad", fail_on=1), Recorder("good")
    tracking = Tracking([bad, good])
    tracking.start([rec(0, 0.2)])
    for t in range(1, 6):
        tracking.trial(rec(t, 0.1 * t))
    tracking.close()
    assert bad.seen == [] and bad.closed == 1  # off after trial 1, released once
    assert [t for t, _ in good.seen] == [1, 2, 3, 4, 5] and good.started == [0] and good.closed == 1
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "bad failed (ConnectionError: bad is unreachable)" in msg and "the bad settings" in msg
    assert tracking.failed == {"bad": "ConnectionError: bad is unreachable"}


def test_best_so_far_counts_full_fidelity_successes_only():
    sink = Recorder("s")
    tracking = Tracking([sink])
    tracking.start([])
    for r in [rec(0, 0.1), rec(1, 0.9, fidelity=0.3), rec(2, 0.3), rec(3, None), rec(4, 0.2)]:
        tracking.trial(r)
    tracking.close()
    assert sink.seen == [(0, 0), (1, 0), (2, 2), (3, 2), (4, 2)]


def test_a_slow_sink_never_holds_the_loop(caplog):
    caplog.set_level(logging.WARNING, logger="evomerge.tracking")
    slow = Recorder("slow", delay=0.2)
    tracking = Tracking([slow], close_timeout=0.3)
    tracking.start([])
    t0 = time.perf_counter()
    for t in range(10):
        tracking.trial(rec(t, 0.5))
    enqueue = time.perf_counter() - t0
    t0 = time.perf_counter()
    tracking.close()
    waited = time.perf_counter() - t0
    assert enqueue < 0.05  # 10 trials queued while the sink needs 2 s for them
    assert 0.25 < waited < 1.0  # close waits close_timeout, not the 2 s
    assert len(slow.seen) < 10
    assert any("did not finish within" in r.getMessage() for r in caplog.records)


def test_no_sinks_no_thread():
    tracking = Tracking([])
    tracking.start([rec(0, 0.1)])
    tracking.trial(rec(1, 0.2))
    tracking.close()
    assert tracking._thread is None

"""A lost Ray cluster stops the study with one line and exit 69, resumable; it never hangs.

Drills on a real local Ray under a real `evomerge run`: its raylet SIGKILLed (every node gone),
its GCS SIGKILLed (the head node gone, the address silent), no node free for a worker
(placement_timeout), an address that does not answer. Every process a drill's Ray started is
tracked and must be gone when the drill ends (the finalizer kills any that are not, so a failed
drill leaves nothing behind either).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from evomerge.errors import EXIT_CLUSTER_LOST, ClusterLostError, ConfigError  # noqa: E402
from evomerge.executors import make_executor  # noqa: E402
from evomerge.runstore import RunStore  # noqa: E402
from tests.study_factory import make_tiny_study, write_task  # noqa: E402

pytestmark = pytest.mark.ray

EVOMERGE = [sys.executable, "-m", "evomerge.cli"]
ROOT = Path(__file__).resolve().parents[1]


class Tracked:
    """A subprocess and every process below it, seen by polling while it runs (Ray's workers
    are children of its raylet, and are reparented once that dies)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.seen: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.snapshot()
            time.sleep(0.2)

    def snapshot(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(p.pid, p)
        return list(self.seen.values())

    def named(self, name: str) -> list[psutil.Process]:
        found = []
        for p in self.snapshot():
            with contextlib.suppress(psutil.Error):
                if p.name() == name:
                    found.append(p)
        return found

    def finish(self, timeout: float) -> tuple[int | None, str]:
        """(exit code, stderr); exit code None when it was still running after `timeout`."""
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
            return None, err
        finally:
            self._stop.set()
        return self.proc.returncode, err

    def leftovers(self, grace: float = 5.0) -> list[str]:
        """Processes it started that still run `grace` seconds after it ended."""
        deadline = time.monotonic() + grace
        while True:
            alive = []
            for p in self.seen.values():
                with contextlib.suppress(psutil.Error):
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{p.pid} {p.name()}")
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)

    def kill_all(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        for p in self.seen.values():
            with contextlib.suppress(psutil.Error):
                p.kill()  # psutil checks the creation time: a reused pid is not touched


@pytest.fixture
def tracked():
    started: list[Tracked] = []

    def start(args: list[str]) -> Tracked:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
        env.pop("RAY_ADDRESS", None)
        t = Tracked([*EVOMERGE, *args], env)
        started.append(t)
        return t

    yield start
    for t in started:
        t.kill_all()


@pytest.fixture(scope="module")
def slow_study(tmp_path_factory) -> Path:
    """The tiny study with 400 search documents, so a trial takes a noticeable time (0.1-0.2 s
    here): the window between a fault and Ray noticing it holds tens of trials, not thousands,
    and the budget (400) stays far out of reach."""
    root = tmp_path_factory.mktemp("lost_cluster")
    study = make_tiny_study(root, max_trials=400)
    write_task(root / "tasks", "tiny_search", seed=1, n=400)
    return study


def wait_for_lines(path: Path, n: int, t: Tracked, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        if t.proc.poll() is not None:
            raise AssertionError(f"run ended early: {t.proc.stderr.read()[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no {n} trials within {timeout} s")


def errors_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("evomerge: error:")]


def run_then_kill(slow_study: Path, tmp_path: Path, tracked, process: str) -> tuple:
    """Start `evomerge run` on a local Ray, SIGKILL its `process` after 3 trials; returns
    (the run, its exit code, stderr, seconds from the kill to the exit, trials at the kill)."""
    args = ["run", str(slow_study), "--runs-dir", str(tmp_path), "--name", "r", "--quiet"]
    run = tracked([*args, "--executor", "ray", "--workers", "1"])
    trials = tmp_path / "r" / "trials.jsonl"
    wait_for_lines(trials, 3, run)
    (target,) = run.named(process)
    run.snapshot()  # its worker seen now, before the raylet goes and the worker is reparented
    target.send_signal(signal.SIGKILL)
    killed_at, at_kill = time.monotonic(), trials.read_text().count("\n")
    code, err = run.finish(timeout=170)
    return run, code, err, time.monotonic() - killed_at, at_kill


@pytest.mark.slow
def test_killed_raylet_stops_the_run_in_one_line_and_resume_finishes(slow_study, tmp_path, tracked):
    run, code, err, seconds, at_kill = run_then_kill(slow_study, tmp_path, tracked, "raylet")
    assert code is not None, f"still running 170 s after its raylet died:\n{err[-3000:]}"
    assert code == EXIT_CLUSTER_LOST, err[-3000:]
    assert seconds < 120
    (line,) = errors_of(err)
    assert "lost the local Ray: its only node is dead" in line, line
    assert f"continue with: evomerge resume {tmp_path / 'r'}" in line
    assert "Traceback" not in err
    store = RunStore(tmp_path / "r")
    n = len(store.read_trials())
    assert store.state()["state"] == "interrupted" and store.state()["trials"] == n
    assert at_kill <= n < 400
    # the worker outlived its raylet; evomerge ended it with the rest of that Ray
    assert run.leftovers() == []

    resume = tracked(["resume", str(tmp_path / "r"), "--max-trials", str(n + 4), "--quiet"])
    code, err = resume.finish(timeout=240)
    assert code == 0, err[-3000:]
    records = store.read_trials()
    assert [r.trial for r in records] == list(range(n + 4))
    assert len({r.proposal for r in records}) == n + 4  # nothing evaluated or recorded twice
    assert store.state()["state"] == "finished"
    assert resume.leftovers() == []


@pytest.mark.slow
def test_killed_gcs_stops_the_run_before_ray_aborts_it(slow_study, tmp_path, tracked):
    """The head node gone (here: its GCS): every call into Ray that needs it blocks, and Ray
    ends the process itself after 60 s with no word. evomerge says so first, in one line."""
    run, code, err, seconds, _ = run_then_kill(slow_study, tmp_path, tracked, "gcs_server")
    assert code is not None, f"still running 170 s after its GCS died:\n{err[-3000:]}"
    assert code == EXIT_CLUSTER_LOST, err[-3000:]
    assert seconds < 60
    (line,) = errors_of(err)
    assert "lost the local Ray: its GCS (the head node) has not answered for" in line, line
    assert RunStore(tmp_path / "r").state()["state"] == "interrupted"
    assert run.leftovers() == []  # the raylet's agents outlive a dead GCS; ended as well


def test_unanswering_address_fails_in_seconds(slow_study, tmp_path, tracked):
    """`ray.init(address=...)` retries an address with no cluster for minutes (3.5 here)."""
    with socket_closed_port() as port:
        args = ["run", str(slow_study), "--runs-dir", str(tmp_path), "--name", "r", "--quiet"]
        run = tracked([*args, "--executor", "ray", "--ray-address", f"127.0.0.1:{port}"])
        t0 = time.monotonic()
        code, err = run.finish(timeout=120)
    assert code == EXIT_CLUSTER_LOST, err[-3000:]
    assert time.monotonic() - t0 < 60
    (line,) = errors_of(err)
    assert f"cannot reach the Ray cluster at 127.0.0.1:{port}" in line, line


@contextlib.contextmanager
def socket_closed_port():
    """A local port nobody listens on (bound, then closed)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    yield port


@pytest.fixture
def one_cpu_ray():
    assert not ray.is_initialized()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_no_node_free_for_a_worker_stops_after_placement_timeout(slow_study, one_cpu_ray):
    from evomerge.config import load_study_config
    from evomerge.study_plan import build_plan

    plan = build_plan(load_study_config(str(slow_study), {}))

    @ray.remote(num_cpus=1)
    class Holder:  # another job on the cluster, holding its only CPU
        def ping(self) -> int:
            return 1

    holder = Holder.remote()
    assert ray.get(holder.ping.remote()) == 1
    t0 = time.monotonic()
    with pytest.raises(ClusterLostError, match=r"placement_timeout 3\)") as info:
        make_executor("ray", plan.worker_spec, workers=1, placement_timeout=3)
    assert time.monotonic() - t0 < 30
    assert "1 waiting for 1 CPU and 0 GPU each; 1 node(s) alive" in str(info.value)
    ray.kill(holder)


def test_placement_timeout_is_an_option():
    from evomerge.executors.ray_executor import RayExecutor

    assert RayExecutor.parse_options(None).placement_timeout == 120.0
    assert RayExecutor.parse_options({"placement_timeout": 600}).placement_timeout == 600
    with pytest.raises(ConfigError, match="placement_timeout"):
        RayExecutor.parse_options({"placement_timeout": 0})

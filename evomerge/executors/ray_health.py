"""Telling a lost Ray cluster from a slow one, so that a study never waits on a dead one.

Seen on this machine with Ray 2.60 before this module existed: with the raylet of the local Ray
killed, the study waited with no message (its replacement actor was pending, forever, for a node
that no longer existed); with the GCS gone, every call into Ray that needs it blocks, and after
60 s Ray ends the driver process itself with no word of why (state.json still "running").

So the executor never waits on Ray without a limit. It waits in slices of `POLL_SECONDS`; before
each it asks `ClusterWatch.check()`, and after an idle one the slot deadlines too:
- the GCS must answer `ray.nodes()` within `gcs_timeout()` (a third of Ray's own limit, so the
  study has stopped with its message before Ray kills the process; measured here: the GCS
  killed, the run exited 69 35-40 s later, of which 7 s was `ray.shutdown`). The question
  runs in a daemon thread: a GCS that is gone makes the call block, not fail;
- at least one node must be alive (Ray marks the node of a killed raylet dead 10-20 s after);
- a worker that Ray cannot place on any node (`placement_timeout`), or that does not finish
  loading (`start_timeout`), stops the study once no other worker is up to carry it; while some
  workers live, lost ones wait for a node and the study goes on with the others.
Each failure is one `ClusterLostError` (or `WorkersLostError` for a slow start) that names what
was lost; the study marks the run interrupted and `evomerge resume` continues it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from evomerge.errors import ClusterLostError, UserError

#: Longest single wait on Ray before the health of the cluster is looked at again.
POLL_SECONDS = 2.0
#: How often the GCS is asked for the node table (a small reply; one question at a time).
PROBE_SECONDS = 5.0
#: Ray's own limit on a silent GCS, as Ray spells it: past it, Ray aborts the driver process.
RAY_GCS_LIMIT = "RAY_gcs_rpc_server_reconnect_timeout_s"


class WorkersLostError(UserError, RuntimeError):
    """Workers died more often than the study allows, or took longer to start than it allows."""


def gcs_timeout() -> float:
    """Seconds the GCS may go without answering: a third of Ray's own limit
    (`RAY_gcs_rpc_server_reconnect_timeout_s`, 60 s by default, so 20 s; raise it for a
    fault-tolerant head that restarts), after which Ray aborts the driver with no message. The
    rest is for noticing it (`PROBE_SECONDS`), shutting down and writing state.json."""
    try:
        ray_limit = float(os.environ.get(RAY_GCS_LIMIT, "60"))
    except ValueError:
        ray_limit = 60.0
    return max(5.0, ray_limit / 3)


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail in seconds on a `host:port` that does not answer: `ray.init(address=...)` retries an
    unreachable address for minutes. Other forms (`auto`, `ray://...`) are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address or not host:
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ClusterLostError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}): start it, or "
            "fix executor.ray_address / --ray-address / $RAY_ADDRESS"
        ) from None


class ClusterWatch:
    """Whether the cluster is still there: its GCS answers and some node is alive."""

    def __init__(self, where: str, timeout: float | None = None) -> None:
        self.where = where  # "the local Ray" or "the Ray cluster at ADDRESS", for messages
        self.timeout = gcs_timeout() if timeout is None else timeout
        self._lock = threading.Lock()
        self._probe: threading.Thread | None = None
        self._asked = -PROBE_SECONDS  # monotonic time of the last question
        self._waiting: float | None = None  # since when a question is unanswered (else None)
        self._nodes: list[dict[str, Any]] | None = None  # the last answer
        self._error: BaseException | None = None  # of the last question, if it raised

    def check(self, fresh: bool = False) -> None:
        """Raise `ClusterLostError` if the GCS has stopped answering or no node is alive.

        Judges by the last answer (at most `PROBE_SECONDS` old when called that often) and asks
        again when that is due; `fresh` asks now and waits for the answer (at most the GCS
        timeout)."""
        now = time.monotonic()
        if not self._asking() and (fresh or now - self._asked >= PROBE_SECONDS):
            self._ask(now)
        if fresh and self._probe is not None:
            with self._lock:
                since = now if self._waiting is None else self._waiting
            self._probe.join(max(0.0, self.timeout - (now - since)) + 0.1)
            now = time.monotonic()
        with self._lock:
            waiting, nodes, error = self._waiting, self._nodes, self._error
        if waiting is not None and now - waiting > self.timeout:
            why = f"last error: {type(error).__name__}: {error}" if error else "no reply"
            raise ClusterLostError(
                f"lost {self.where}: its GCS (the head node) has not answered for "
                f"{now - waiting:.0f} s ({why.splitlines()[0]})"
            )
        if nodes is not None and not any(n.get("Alive") for n in nodes):
            raise ClusterLostError(f"lost {self.where}: {describe_dead(nodes)}")

    def nodes(self) -> list[dict[str, Any]]:
        """The node table of the last answer (empty before the first)."""
        with self._lock:
            return list(self._nodes or [])

    def _asking(self) -> bool:
        return self._probe is not None and self._probe.is_alive()

    def _ask(self, now: float) -> None:
        self._asked = now
        with self._lock:
            if self._waiting is None:
                self._waiting = now
        self._probe = threading.Thread(
            target=self._question, name="evomerge-ray-watch", daemon=True
        )
        self._probe.start()

    def _question(self) -> None:
        import ray

        try:
            nodes = ray.nodes()  # blocks while the GCS is unreachable (hence the thread)
        except Exception as exc:  # an error is no answer: the silence goes on counting
            with self._lock:
                self._error = exc
            return
        with self._lock:
            self._nodes, self._waiting, self._error = nodes, None, None


def describe_dead(nodes: Sequence[dict[str, Any]]) -> str:
    """'its only node is dead (10.0.0.1: why)' or 'all 3 nodes are dead (10.0.0.1: why; ...)'."""

    def one(n: dict[str, Any]) -> str:
        why = n.get("DeathReasonMessage") or "no reason given"
        return f"{n.get('NodeManagerAddress') or n.get('NodeID', '?')[:8]}: {why}"

    if len(nodes) == 1:
        return f"its only node is dead ({one(nodes[0])})"
    shown = "; ".join(one(n) for n in nodes[:3]) + ("; ..." if len(nodes) > 3 else "")
    return f"all {len(nodes)} nodes are dead ({shown})"


@dataclass
class WorkerSlot:
    """One worker position: its current actor, its phase, its job and where it runs.

    Phases: placing (`placing` pending: Ray has not found a node), loading (`starting` pending:
    sources and tasks are being loaded), up (both None: takes jobs)."""

    actor: Any = None
    placing: Any = None  # ObjectRef of placed() until the actor runs on a node, else None
    starting: Any = None  # ObjectRef of ready() until the Worker is built, else None
    since: float = 0.0  # monotonic time the current phase began
    job: Any = None  # the Job it evaluates now
    ref: Any = None  # ObjectRef of the running evaluate()
    name: str = ""  # host:pid:device of the Worker, once started
    node: str = ""  # Ray node id, once placed

    @property
    def up(self) -> bool:
        return self.actor is not None and self.placing is None and self.starting is None


def check_deadlines(
    slots: Sequence[WorkerSlot],
    *,
    placement_timeout: float,
    start_timeout: float,
    every_slot: bool,
    need: str,
    watch: ClusterWatch,
) -> None:
    """Raise when workers that should be up are overdue.

    `every_slot` (while the executor starts): each slot has its own deadlines. Otherwise a
    deadline counts only while no worker is up, from the time the last one was lost (when its
    replacement was created): the others carry the study meanwhile, as before."""
    now = time.monotonic()
    if not every_slot and any(s.up for s in slots):
        return
    placing = [s for s in slots if s.placing is not None]
    loading = [s for s in slots if s.placing is None and s.starting is not None]
    if placing and (every_slot or not loading):
        waited = now - (min if every_slot else max)(s.since for s in placing)
        if waited > placement_timeout:
            alive = [n for n in watch.nodes() if n.get("Alive")]
            cpus = sum(n.get("Resources", {}).get("CPU", 0.0) for n in alive)
            gpus = sum(n.get("Resources", {}).get("GPU", 0.0) for n in alive)
            raise ClusterLostError(
                f"{watch.where} placed no worker for {waited:.0f} s (executor.placement_timeout "
                f"{placement_timeout:g}): {len(placing)} waiting for {need} each; {len(alive)} "
                f"node(s) alive with {cpus:g} CPUs and {gpus:g} GPUs in all. Its nodes are lost "
                "or busy: free them, or raise executor.placement_timeout for an autoscaling "
                "cluster that must first add nodes"
            )
    for slot in loading:
        if now - slot.since > start_timeout:
            raise WorkersLostError(
                f"a Ray worker on node {slot.node[:8]} did not load its models and tasks within "
                f"{start_timeout:g} s (executor.start_timeout): raise it for large models or a "
                "slow shared filesystem, or check that node"
            )


def descendants(pid: int | None = None) -> set[int]:
    """Processes below `pid` (default: this one), read from /proc (empty where there is none):
    a local Ray's GCS, raylet, agents and workers, taken before it is shut down."""
    parents: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat", "rb") as f:
                        ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue  # exited meanwhile
                parents.setdefault(ppid, []).append(int(entry))
    found: set[int] = set()
    todo = [os.getpid() if pid is None else pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def kill_orphans(pids: set[int], grace: float = 2.0) -> None:
    """SIGKILL the Ray processes among `pids` that outlived the shutdown of their local Ray.

    A worker whose raylet died keeps running (seen here: a minute and counting, holding its
    resident models, and on a GPU its memory, so the next `resume` would find the GPU full), as
    do the raylet's agents when the GCS died first: nothing is left to end them. Only processes
    whose command is Ray's (`ray::...`, or a program of the ray package) are touched, after
    `grace` seconds to exit by themselves."""

    def ray_process(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/stat", "rb") as f:
                zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
        except (OSError, IndexError):
            return False  # gone (or no /proc: nothing to do there)
        return not zombie and (cmd.startswith(b"ray::") or b"/site-packages/ray/" in cmd)

    left = {p for p in pids if ray_process(p)}
    deadline = time.monotonic() + grace
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = {p for p in left if ray_process(p)}
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def lost_worker_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors that mean "this worker is gone" (its job is sent again to a new actor),
    as opposed to an error raised by the job itself."""
    import ray.exceptions as rex

    return (
        rex.RayActorError,  # ActorDiedError, ActorUnavailableError
        rex.WorkerCrashedError,
        rex.NodeDiedError,
        rex.LocalRayletDiedError,
        rex.OutOfMemoryError,  # killed by Ray's memory monitor
        rex.ObjectLostError,  # OwnerDiedError, ObjectReconstructionFailedError, ...
    )


@contextlib.contextmanager
def sigterm_as_terminated() -> Iterator[None]:
    """`ray.init` installs a SIGTERM handler that calls sys.exit(15), skipping the study's
    bookkeeping; a SIGTERM while it runs becomes evomerge's Terminated (exit 143, resumable),
    and the handler that was there before is put back."""
    from evomerge.errors import Terminated

    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    except SystemExit as exc:
        if exc.code == signal.SIGTERM:
            raise Terminated from None
        raise
    finally:
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)

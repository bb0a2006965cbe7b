"""The run directory's lock: one process runs a study at a time.

`run`, `resume` and `demo` take `RUN_DIR/.lock` with `flock(LOCK_EX)` before anything else and hold
it until the process exits. The kernel drops a flock when its process dies, by SIGKILL too, so a
lock left by a dead process never blocks; the file stays, holding the last holder's host and pid
only so that a refused second process can name it. (A pid in state.json cannot do this job: it is
checked before the ~7 s of setup and written after them, and pids are reused.)

The lock is re-entrant within a process (an in-process `run` then `resume`, as the tests do), is
not inherited across exec (Python opens files non-inheritable), and a forked child closes its copy,
so a helper process outliving the controller never keeps a run locked. flock is per host on local
filesystems; Linux maps it to NFS locks on NFS mounts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from evomerge.errors import RunDirError

LOCK = ".lock"
#: how long a refused process retries before naming the holder (a `status` probe holds the lock
#: for microseconds, and a new holder writes its name just after locking)
RETRY_SECONDS = 0.3

_held: dict[Path, int] = {}  # run dir -> fd of the lock this process holds


class RunLockedError(RunDirError):
    """Another live process runs this run directory."""


def lock_run_dir(run_dir: str | Path) -> None:
    """Lock `run_dir` (which must exist) for the life of this process; RunLockedError naming the
    holder (host, pid) when another process has it. Taking it again in the same process is a no-op."""
    path = Path(run_dir).resolve()
    if path in _held:
        return
    try:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise RunDirError(f"{path / LOCK}: cannot open the run's lock ({exc.strerror})") from None
    deadline = time.monotonic() + RETRY_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # e.g. ENOLCK on some NFS
                os.close(fd)
                raise RunDirError(
                    f"{path / LOCK}: cannot lock the run ({exc.strerror}); put the run "
                    "directory on a filesystem with file locks (--runs-dir)"
                ) from None
            if time.monotonic() >= deadline:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunLockedError(f"{path} {describe_holder(holder)}") from None
            time.sleep(0.02)
    info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    info["command"] = " ".join(["evomerge", *sys.argv[1:2]])
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _held[path] = fd


def lock_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """Who holds the lock of `run_dir` now: {host, pid, since, command}, or None when nobody does.
    Probes with a shared lock held for microseconds (a refused locker retries past it)."""
    path = Path(run_dir).resolve()
    if path in _held:
        return _read_holder(_held[path])
    try:
        fd = os.open(path / LOCK, os.O_RDONLY)
    except OSError:
        return None  # no lock file: never run by a version that locks, or not a run dir
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _read_holder(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def release_run_dir(run_dir: str | Path) -> None:
    """Unlock `run_dir` if this process holds it (the CLI never needs this: exit releases it)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)


def describe_holder(holder: dict[str, Any]) -> str:
    """'is being run by process 123 on host h (evomerge resume, since 12:00:01); ...'."""
    if not holder.get("pid"):
        return "is locked by another process (it has not written its name yet); try again"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
    what = f"{holder.get('command', 'evomerge')}, since {since}"
    return (
        f"is being run by process {holder['pid']} on host {holder.get('host', '?')} ({what}); "
        "wait for it to finish or stop it first"
    )


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _close_in_child() -> None:
    """A forked child shares the parent's lock; closing its copy keeps the lock with the parent
    only (flock is released when the last descriptor of it closes)."""
    for fd in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)

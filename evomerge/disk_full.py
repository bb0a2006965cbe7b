"""No space left on a device: recognizing it under any wrapper, and the one line that says so.

A full disk (ENOSPC) or an exhausted quota (EDQUOT) reaches evomerge as an OSError from its own
writes, as SQLite's "database or disk is full" wrapped by SQLAlchemy and Optuna, or as the text
of an error from a writer in another language. The writer that knows the path raises
`DiskFullError` through `no_space`; the study adds how to resume; the CLI prints it and exits 75.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from evomerge.errors import DiskFullError

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# SQLite's SQLITE_FULL, and the strerror texts as other libraries embed them in their messages
_FULL_TEXT = ("database or disk is full", "no space left on device", "disk quota exceeded")


def disk_full_cause(exc: BaseException | None) -> BaseException | None:
    """The exception in `exc`'s chain (itself, its causes, what it was raised while handling)
    that says the disk or the quota is full; None when there is none."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError):
            return exc
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return exc
        if not isinstance(exc, OSError) and any(t in _text(exc) for t in _FULL_TEXT):
            return exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


def _text(exc: BaseException) -> str:
    try:
        return str(exc).lower()
    except Exception:  # a broken __str__ of someone else's exception says nothing here
        return ""


def no_space(
    path: str | Path, cause: BaseException | None = None, *, writing: str = "", hint: str = ""
) -> DiskFullError:
    """The error for a full disk met while writing `path` (or `writing`, said in words): names
    the filesystem and its free space, then `hint` (what to do next)."""
    path = Path(path)
    quota = getattr(cause, "errno", None) == errno.EDQUOT or "quota" in str(cause).lower()
    mount = mount_point(path)
    if quota:
        state = "disk quota exceeded"
    else:
        try:
            usage = shutil.disk_usage(mount)
            state = f"{_size(usage.free)} free of {_size(usage.total)}"
        except OSError:
            state = "full"
    msg = f"no space left on {mount} ({state}) while writing {writing or path}"
    if hint:
        msg += f"; {hint}"
    return DiskFullError(msg, str(path), errno.EDQUOT if quota else errno.ENOSPC, hinted=bool(hint))


@contextmanager
def raising_no_space(path: str | Path, *, writing: str = "", hint: str = "") -> Iterator[None]:
    """Turn a full disk met inside the block into `no_space(path, ...)`; other errors pass."""
    try:
        yield
    except Exception as exc:
        cause = disk_full_cause(exc)
        if cause is None:
            raise
        raise no_space(path, cause, writing=writing, hint=hint) from exc


def full_disk_at(directory: str | Path, probe_bytes: int = 32768) -> OSError | None:
    """The ENOSPC/EDQUOT a `probe_bytes` write into `directory` meets now; None when it fits.

    Why: SQLite says "disk I/O error", with no errno, when it cannot create a WAL database's
    32 KiB -shm index for want of space; only a write of that size tells a full disk from a
    damaged file, and the two need opposite advice (free space vs rebuild the state)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=directory) as probe:
            probe.write(b"\0" * probe_bytes)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        return exc if exc.errno in FULL_ERRNOS else None
    return None


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem that holds (or would hold) `path`."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    p = p.resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")

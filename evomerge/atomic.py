"""Atomic file replacement, the one way evomerge writes state that must never be half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from evomerge.disk_full import FULL_ERRNOS, no_space


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write to a temp file in the same folder, fsync, then os.replace: readers see the old file
    or the new one, never a torn one; a failed write leaves no temp file behind.

    A full disk raises `DiskFullError` naming `path` (the old file is intact). The bytes go
    through os.write, not a buffered file: a buffered file retries its flush when closed after
    a failed write, which fails again and buries the first error under a second one."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            raise no_space(path, exc) from exc
        raise

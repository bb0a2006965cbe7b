"""Progress of a study on the terminal: trials done, best so far, ETA. Silent when not a TTY."""

from __future__ import annotations

import sys
import time
from typing import Any


class StudyProgress:
    def __init__(
        self, total: int, *, enabled: bool = True, done: int = 0, best: Any = None
    ) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.total = total
        self._bar = None
        self._start = time.monotonic()
        self._start_done = done
        if not self.enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("[bold]candidates"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("best {task.fields[best]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task("study", total=total, completed=done, best=_fmt(best))

    def update(self, done: int, best: Any) -> None:
        """`done` candidates so far (a racing candidate's rungs count once)."""
        if self._bar is not None:
            self._bar.update(self._task, completed=done, best=_fmt(best))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _fmt(best: Any) -> str:
    if best is None or not best.fitness:
        return "-"
    return f"{best.fitness[0]:.4f} (trial {best.trial})"

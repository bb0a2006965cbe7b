"""Executors: where candidates are evaluated (in process, or on Ray actors).

Entries are lazy, so Ray is imported only when the ray executor is built. A new executor is one
module with an `Executor` subclass and one line here (or an `evomerge.executors` entry point).
"""

from __future__ import annotations

from typing import Any

from evomerge.executors.base import EXECUTORS, Executor, Job, JobResult

EXECUTORS.register("local", "evomerge.executors.local:LocalExecutor")
EXECUTORS.register("ray", "evomerge.executors.ray_executor:RayExecutor")


def make_executor(kind: str, spec: Any, *, workers: int = 1, **options: Any) -> Executor:
    """Build executor `kind` for `spec`; `options` are checked against its Options model."""
    cls = EXECUTORS.get(kind, where="executor.kind")
    return cls(spec, workers=workers, options=cls.parse_options(options))


__all__ = ["EXECUTORS", "Executor", "Job", "JobResult", "make_executor"]

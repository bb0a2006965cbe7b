"""Executors: where candidates are evaluated (in process, or on Ray actors)."""

from __future__ import annotations

import importlib
from typing import Any

from evomerge.executors.base import EXECUTORS, Executor, Job, JobResult

# Imported on demand: Ray is heavy and only the ray executor needs it.
_MODULES = {"local": "evomerge.executors.local", "ray": "evomerge.executors.ray_executor"}


def make_executor(kind: str, spec: Any, **options: Any) -> Executor:
    if kind in _MODULES:
        importlib.import_module(_MODULES[kind])
    return EXECUTORS.get(kind, where="executor.kind")(spec, **options)


__all__ = ["EXECUTORS", "Executor", "Job", "JobResult", "make_executor"]

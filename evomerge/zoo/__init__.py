"""The demo model zoo: a tiny Llama base and skill fine-tunes trained locally on CPU, plus tasks.

Light to import (no torch): `build_zoo`, `ZooInfo` and `write_study_yaml` load `evomerge.zoo.build`
on first use.
"""

from __future__ import annotations

from typing import Any

from evomerge.zoo.data import SKILLS
from evomerge.zoo.tasks import materialize_tasks, resolve_evals_dir, task_names

__all__ = [
    "SKILLS",
    "ZooInfo",
    "build_zoo",
    "materialize_tasks",
    "resolve_evals_dir",
    "task_names",
    "write_study_yaml",
]

_LAZY = {"build_zoo", "ZooInfo", "write_study_yaml", "ZooSettings"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from evomerge.zoo import build

        return getattr(build, name)
    raise AttributeError(f"module 'evomerge.zoo' has no attribute {name!r}")

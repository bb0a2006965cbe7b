"""The executor contract: submit jobs, wait for results. The study loop knows nothing of Ray."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from evomerge.registry import Registry
from evomerge.worker import Outcome, WorkerSpec


@dataclass(frozen=True)
class Job:
    key: int  # the optimizer's proposal id (or any caller key)
    recipe: dict[str, Any]
    split: str = "search"


@dataclass(frozen=True)
class JobResult:
    job: Job
    outcome: Outcome


class Executor(ABC):
    """Runs candidate evaluations on one or more workers."""

    name: str = ""

    def __init__(self, spec: WorkerSpec, *, workers: int = 1, **options: Any) -> None:
        self.spec = spec
        self.workers = workers

    @abstractmethod
    def submit(self, job: Job) -> None:
        """Queue a job; returns at once."""

    @abstractmethod
    def wait(self) -> list[JobResult]:
        """Block until at least one job finished; return every finished one."""

    @abstractmethod
    def in_flight(self) -> int:
        """Jobs submitted and not yet returned by wait()."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release workers."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


EXECUTORS: Registry[type[Executor]] = Registry("executor")

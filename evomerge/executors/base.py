"""The executor contract: submit jobs, wait for results. The study loop knows nothing of Ray."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from evomerge.options import PluginOptions
from evomerge.recipe import Recipe
from evomerge.registry import Registry
from evomerge.worker import Outcome, WorkerSpec


@dataclass(frozen=True)
class Job:
    """One candidate to evaluate; the Recipe itself travels (pydantic models pickle)."""

    key: int  # any caller key (the study numbers its jobs)
    recipe: Recipe
    split: str = "search"
    rung: int | None = None  # racing: score the items of this rung ...
    scored: int | None = None  # ... that rung `scored` did not have (None: every item)


@dataclass(frozen=True)
class JobResult:
    job: Job
    outcome: Outcome


class Executor(ABC):
    """Runs candidate evaluations on one or more workers."""

    name: ClassVar[str] = ""
    #: what `executor: {kind: <name>, ...}` may set beside kind and workers, checked at load
    Options: ClassVar[type[PluginOptions]] = PluginOptions

    def __init__(
        self, spec: WorkerSpec, *, workers: int = 1, options: PluginOptions | None = None
    ) -> None:
        self.spec = spec
        self.workers = workers
        self.options = options if options is not None else self.Options()

    @classmethod
    def parse_options(cls, options: dict[str, object] | None) -> PluginOptions:
        return cls.Options.parse(options, f"executor {cls.name!r}")

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


#: Built-in entries are lazy (evomerge/executors/__init__.py: Ray is imported only by its
#: executor); plugins register here or through the `evomerge.executors` entry-point group.
EXECUTORS: Registry[type[Executor]] = Registry(
    "executor", Executor, classes=True, entry_points="evomerge.executors"
)

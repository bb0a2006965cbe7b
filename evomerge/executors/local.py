"""In-process executor: one worker, jobs run one at a time inside wait(). For laptops and tests."""

from __future__ import annotations

from collections import deque

from pydantic import Field

from evomerge.executors.base import Executor, Job, JobResult
from evomerge.options import PluginOptions
from evomerge.worker import Worker, WorkerSpec


class LocalOptions(PluginOptions):
    threads: int | None = Field(
        None,
        ge=1,
        description="torch threads of a CPU worker (default 1: tiny models run faster single-threaded)",
    )


class LocalExecutor(Executor):
    name = "local"
    Options = LocalOptions

    def __init__(
        self, spec: WorkerSpec, *, workers: int = 1, options: PluginOptions | None = None
    ) -> None:
        super().__init__(spec, workers=1, options=options)
        threads = self.options.threads  # type: ignore[attr-defined]
        if threads is not None or Worker.uses_cpu(spec):
            import torch

            # One thread unless asked: on 2 shared cores the demo's candidates ran 5-20x slower
            # with torch's default of one thread per core (OpenMP barriers under load).
            torch.set_num_threads(threads or 1)
        self.worker = Worker(spec)
        self._queue: deque[Job] = deque()

    def submit(self, job: Job) -> None:
        self._queue.append(job)

    def wait(self) -> list[JobResult]:
        job = self._queue.popleft()
        return [JobResult(job, self.worker.evaluate(job.recipe, job.split, job.rung, job.scored))]

    def in_flight(self) -> int:
        return len(self._queue)

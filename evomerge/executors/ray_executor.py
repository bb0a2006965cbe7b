"""Ray executor: one long-lived actor per GPU (or per CPU slot), each a resident `Worker`.

Use it with `executor: {kind: ray, workers: K}` in the study config (or `--executor ray --workers
K`). With `ray_address` (or the environment variable `RAY_ADDRESS`) the study joins that cluster
and leaves it running when it ends; without one it starts a local Ray sized for the K workers and
shuts it down at the end. Every actor builds its `Worker` once (sources resident, live model,
lm-eval tasks) and then evaluates candidates one after another: each recipe is merged in place
into the live model and scored, nothing touches disk. On a multi-node cluster the model and task
paths of the study must be readable at the same path on every node (a shared filesystem).

Placement: one actor per worker, `num_gpus=gpus_per_worker` (default 1 when the cluster has GPUs
and the study's device is not `cpu`, else 0) and `num_cpus=cpus_per_worker` (default 1; the
actor's torch runs that many threads), spread over nodes. A local Ray gets K x cpus_per_worker
CPU slots, so K may exceed the cores (then the workers share them).
Inside an actor that got a GPU, `device: auto` (or `cuda:N`) is the GPU Ray assigned to it.

Dispatch: `wait()` returns as soon as any candidate finished (with every other one that finished
meanwhile), so an Optuna sampler asks for the next candidate while the others still run.
CMA-ES (`optimizer: cma`) works in generations: the next one is asked only when every member of
this one is told, so a generation waits for its slowest member while the other workers idle.
With population lambda, K workers and candidates of about t seconds each, a generation takes
about ceil(lambda / K) x t, a speedup of lambda / ceil(lambda / K) over one worker: the default
lambda = 9 (6 genes) on K = 4 gives 3 rounds, a speedup of 3 rather than 4, so choose `popsize`
a multiple of K. Optuna samplers (TPE, NSGA-II, optuna_cmaes) have no such barrier.

Faults: an actor that dies (killed, host out of memory, node lost) is replaced by a new actor and
its candidate is queued again, first in line; nothing finished is lost and nothing is recorded
twice. After `max_replacements` losses (default 3 x workers) the study stops with
`WorkersLostError`. A candidate that fails by itself (NaN metrics, an exception while merging or
scoring) comes back as an `Outcome` with its error and is recorded as failed, not retried. CUDA
out of memory stops the study with a `ResourceError` that says what to reduce.

Memory per worker, for a model of N parameters merged from M sources:
- resident sources: (M + 1) x N x b_file for the base and the M sources, each in the dtype of its
  files (M x N x b_file when the study has no base model);
- the live model: N x b_study, b_study the bytes per weight of the study's `dtype`;
- activations of one batch of `tasks.batch_size` sequences, and while merging a few float32
  copies of the tensor being merged (the largest is usually the embedding).
Example: 7B parameters, base + 3 sources in bf16 files, dtype bfloat16: 4 x 14 GB + 14 GB = 70 GB
plus activations, one 80 GB GPU per worker (with dtype float32 the live model alone is 28 GB).
It lives on the worker's device: GPU memory for a GPU worker, host memory for a CPU worker, and
the host must also hold one model while it loads.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections import deque
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from evomerge.errors import ConfigError, UserError
from evomerge.executors.base import Executor, Job, JobResult
from evomerge.options import PluginOptions
from evomerge.recipe import Recipe
from evomerge.worker import Outcome, WorkerSpec

# Environment the driver passes to its actors (a joined cluster does not inherit it).
ACTOR_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
    "TQDM_DISABLE",
    "HF_DATASETS_DISABLE_PROGRESS_BARS",
    "TRANSFORMERS_VERBOSITY",
)


class WorkersLostError(UserError, RuntimeError):
    """Workers died more often than the study allows: the cluster cannot keep them alive."""


class WorkerActor:
    """Runs inside a Ray actor: builds the Worker once, then evaluates candidates."""

    def __init__(self, spec: WorkerSpec, env: dict[str, str], threads: int) -> None:
        os.environ.update(env)
        import torch

        from evomerge.worker import Worker

        torch.set_num_threads(threads)
        self.worker: Worker | None = None
        self.error: BaseException | None = None
        try:
            self.worker = Worker(spec)
            self.worker.scorer("search")  # tasks built now: a bad task fails at start, not later
        except Exception as exc:  # kept for ready(): the driver re-raises the original error
            self.error = exc

    def ready(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        import ray

        assert self.worker is not None
        node = ray.get_runtime_context().get_node_id()
        return {"name": self.worker.name, "node": node, "load_seconds": self.worker.load_seconds}

    def evaluate(self, recipe: Recipe, split: str) -> Outcome:
        assert self.worker is not None  # ready() succeeded before any job is sent
        return self.worker.evaluate(recipe, split)


@dataclass
class WorkerSlot:
    """One worker position: its current actor, whether it is up, its job and where it runs."""

    actor: Any = None
    starting: Any = None  # ObjectRef of ready() while the actor starts, else None
    job: Job | None = None
    ref: Any = None  # ObjectRef of the running evaluate()
    name: str = ""  # host:pid:device of the Worker, once started
    node: str = ""  # Ray node id, once started


class RayOptions(PluginOptions):
    ray_address: str | None = Field(
        None, description="join this Ray cluster (default: $RAY_ADDRESS, else a local Ray)"
    )
    gpus_per_worker: float | None = Field(
        None, ge=0, description="default: 1 when the cluster has GPUs, else 0"
    )
    threads: int | None = Field(
        None, ge=1, description="torch threads of a worker (default: its CPUs, at least 1)"
    )
    cpus_per_worker: float | None = Field(
        None, ge=0, description="Ray CPUs reserved per worker (default: threads, else 1)"
    )
    max_replacements: int | None = Field(
        None, ge=0, description="lost actors replaced before the study stops (default 3 x workers)"
    )
    start_timeout: float = Field(900.0, gt=0, description="seconds an actor may take to start")


class RayExecutor(Executor):
    name = "ray"
    Options = RayOptions

    def __init__(
        self, spec: WorkerSpec, *, workers: int = 1, options: PluginOptions | None = None
    ) -> None:
        import ray

        if workers < 1:
            raise ConfigError(f"executor.workers: {workers} (needs at least 1)")
        super().__init__(spec, workers=workers, options=options)
        opts: RayOptions = self.options  # type: ignore[assignment]
        self.address = opts.ray_address or os.environ.get("RAY_ADDRESS") or None
        self.max_replacements = (
            3 * workers if opts.max_replacements is None else opts.max_replacements
        )
        self.start_timeout = opts.start_timeout
        self.replaced = 0  # actors lost and replaced
        self.requeued = 0  # jobs sent again after their actor died
        self._queue: deque[Job] = deque()
        self._slots: list[WorkerSlot] = []
        self._by_ref: dict[Any, WorkerSlot] = {}
        self._closed = False
        if ray.is_initialized():
            self._owns = "none"  # the caller's Ray: used as is, left as is
        elif self.address:
            ray.init(address=self.address, log_to_driver=False)
            self._owns = "connection"
        else:
            self._owns = "local"
        # One CPU slot (and one torch thread) per worker by default: on a busy or small machine
        # more threads per worker made tiny-model candidates 10x slower here, not faster.
        cpus = opts.cpus_per_worker if opts.cpus_per_worker is not None else opts.threads
        self.cpus = float(1 if cpus is None else cpus)
        self.threads = opts.threads or max(1, int(self.cpus))
        if self._owns == "local":
            ray.init(
                num_cpus=max(1, math.ceil(workers * self.cpus)),
                include_dashboard=False,
                log_to_driver=False,
                object_store_memory=256 * 2**20,
            )
        try:
            self.gpus = self._gpus(opts.gpus_per_worker)
            self._check_capacity()
            self.actor_spec = spec.model_copy(update={"device": self._actor_device()})
            self._remote = ray.remote(WorkerActor)
            self._env = {k: os.environ[k] for k in ACTOR_ENV if k in os.environ}
            self._slots = [self._start_actor(WorkerSlot()) for _ in range(workers)]
            self.wait_started()
        except BaseException:
            self.close()
            raise

    # -- placement -------------------------------------------------------------------------------

    def _gpus(self, requested: float | None) -> float:
        import ray

        have = ray.cluster_resources().get("GPU", 0.0)
        device = self.spec.device
        if requested is None:
            requested = 1.0 if have > 0 and device != "cpu" else 0.0
        if requested == 0 and device.startswith("cuda"):
            raise ConfigError(
                f"device {device!r} but the Ray workers get no GPU (cluster GPUs: {have:g}, "
                f"executor.gpus_per_worker: {requested:g}): use device auto or cpu, or add GPUs"
            )
        return float(requested)

    def _check_capacity(self) -> None:
        import ray

        have = ray.cluster_resources()
        for res, per in (("GPU", self.gpus), ("CPU", self.cpus)):
            need = per * self.workers
            if need > have.get(res, 0.0) + 1e-9:
                where = f"the Ray cluster at {self.address}" if self.address else "this machine"
                raise ConfigError(
                    f"executor.workers {self.workers} needs {need:g} {res}s ({per:g} per worker) "
                    f"but {where} has {have.get(res, 0.0):g}: lower executor.workers"
                    + (
                        ", or set executor.gpus_per_worker below 1 to share a GPU"
                        if res == "GPU"
                        else ""
                    )
                )

    def _actor_device(self) -> str:
        if self.gpus > 0 and self.spec.device != "cpu":
            return "cuda"  # Ray sets CUDA_VISIBLE_DEVICES: the actor's GPU is cuda:0 inside it
        return "cpu"

    def _start_actor(self, slot: WorkerSlot) -> WorkerSlot:
        """A new actor in `slot`; it takes jobs once its ready() returns."""
        slot.actor = self._remote.options(
            num_cpus=self.cpus,
            num_gpus=self.gpus,
            max_restarts=0,
            max_task_retries=0,
            scheduling_strategy="SPREAD",
        ).remote(self.actor_spec, self._env, self.threads)
        slot.starting, slot.job, slot.ref = slot.actor.ready.remote(), None, None
        slot.name = slot.node = ""
        self._by_ref[slot.starting] = slot
        return slot

    def wait_started(self) -> None:
        """Block until every slot's actor is up (replacements included), or raise a clear error.

        Called at construction, so bad models or tasks fail before the first candidate. Job
        results that arrive meanwhile stay with their refs until the next `wait()`."""
        while any(s.starting is not None for s in self._slots):
            self._poll(self._wait_any(starting_only=True), [])

    # -- the Executor contract -------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        self._queue.append(job)
        self._dispatch()

    def wait(self) -> list[JobResult]:
        if not self.in_flight():
            raise RuntimeError("RayExecutor.wait() called with no job in flight")
        results: list[JobResult] = []
        while not results:
            self._dispatch()
            self._poll(self._wait_any(), results)
        self._dispatch()
        return results

    def in_flight(self) -> int:
        return len(self._queue) + sum(1 for s in self._slots if s.job is not None)

    def running(self) -> dict[int, WorkerSlot]:
        """Job key -> the slot (actor handle, worker name, node) evaluating it now."""
        return {s.job.key: s for s in self._slots if s.job is not None}

    def close(self) -> None:
        import ray

        if self._closed:
            return
        self._closed = True
        if ray.is_initialized():
            for slot in self._slots:
                with contextlib.suppress(Exception):  # already dead or its node is gone
                    ray.kill(slot.actor, no_restart=True)
        self._slots = []
        self._by_ref = {}
        if self._owns != "none":
            ray.shutdown()  # stops a local Ray; only disconnects from a joined cluster

    # -- internals -------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        for slot in self._slots:
            if not self._queue:
                return
            if slot.starting is None and slot.job is None:
                job = self._queue.popleft()
                slot.job = job
                slot.ref = slot.actor.evaluate.remote(job.recipe, job.split)
                self._by_ref[slot.ref] = slot

    def _wait_any(self, starting_only: bool = False) -> list[Any]:
        """Refs that are done: blocks until at least one is, then takes all that are."""
        import ray

        refs = [r for r, s in self._by_ref.items() if not starting_only or r == s.starting]
        busy = not starting_only and any(s.job is not None for s in self._slots)
        ready, _ = ray.wait(refs, num_returns=1, timeout=None if busy else self.start_timeout)
        if not ready:
            raise WorkersLostError(
                f"no Ray worker started within {self.start_timeout:g} s ({len(refs)} waiting "
                f"for {self.cpus:g} CPU and {self.gpus:g} GPU each): the cluster lacks free "
                "resources; lower executor.workers or free the cluster"
            )
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        return ready

    def _poll(self, ready: list[Any], results: list[JobResult]) -> None:
        import ray

        for ref in ready:
            slot = self._by_ref.pop(ref, None)
            if slot is None:
                continue
            try:
                value = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, UserError):  # bad tasks, out of memory: said in one line
                    raise cause from None
                raise  # a bug: its remote traceback is in the message
            except LOST as exc:
                if isinstance(exc, ray.exceptions.RayActorError) and exc.actor_init_failed:
                    raise RuntimeError(f"a Ray worker failed to start: {exc}") from exc
                self._lost(slot, exc)
                continue
            if slot.starting is not None and ref == slot.starting:
                slot.starting = None
                slot.name, slot.node = value["name"], value["node"]
            else:
                assert slot.job is not None
                results.append(JobResult(slot.job, value))
                slot.job = None
                slot.ref = None

    def _lost(self, slot: WorkerSlot, exc: BaseException) -> None:
        """The slot's actor is gone: queue its job again, first, and start a new actor."""
        import ray

        if slot.job is not None:
            self._queue.appendleft(slot.job)
            self.requeued += 1
        self._by_ref.pop(slot.ref, None)
        self._by_ref.pop(slot.starting, None)
        self.replaced += 1
        if self.replaced > self.max_replacements:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WorkersLostError(
                f"{self.replaced} Ray workers died (at most {self.max_replacements} are replaced); "
                f"last: {type(exc).__name__}: {first}. Check the nodes' memory (a worker holds "
                "its sources resident; see the README: Ray executor) and the Ray logs"
            ) from exc
        with contextlib.suppress(Exception):  # already dead or its node is gone
            ray.kill(slot.actor, no_restart=True)
        self._start_actor(slot)


def _lost_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    return (
        rex.RayActorError,  # ActorDiedError, ActorUnavailableError
        rex.WorkerCrashedError,
        rex.NodeDiedError,
        rex.LocalRayletDiedError,
        rex.OutOfMemoryError,  # killed by Ray's memory monitor
        rex.ObjectLostError,  # OwnerDiedError, ObjectReconstructionFailedError, ...
    )


LOST = _lost_errors()

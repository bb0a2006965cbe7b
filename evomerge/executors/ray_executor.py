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
`gpus_per_worker` below 1 shares a GPU between workers; an integer k above 1 gives each worker k
GPUs of one node (its own STRICT_PACK placement group) and splits its live model by layer over
them (`evomerge.device_map`).
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
`WorkersLostError`. A lost cluster (every node dead, the GCS silent, or no worker placed for
`placement_timeout` while none is up) stops it within about two minutes with `ClusterLostError`
(exit 69, resumable), never a silent wait: see `ray_health`. A candidate that fails by itself
(NaN metrics, an exception while merging or scoring) comes back as an `Outcome` with its error
and is recorded as failed, not retried. CUDA out of memory stops the study with a
`ResourceError` that says what to reduce.

Memory per worker: README.md, "Executors: local and Ray".
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from collections import deque
from typing import Any

from pydantic import Field

from evomerge.errors import ConfigError, UserError
from evomerge.executors.base import Executor, Job, JobResult
from evomerge.executors.ray_health import (
    POLL_SECONDS,
    ClusterWatch,
    WorkersLostError,
    WorkerSlot,
    check_deadlines,
    check_reachable,
    descendants,
    kill_orphans,
    lost_worker_errors,
    sigterm_as_terminated,
)
from evomerge.options import PluginOptions
from evomerge.recipe import Recipe
from evomerge.worker import Outcome, WorkerSpec

# Environment the driver passes to its actors (a joined cluster does not inherit it): only the
# variables set in the driver, with their values; the Hugging Face ones so that workers read the
# cache `evomerge fetch` filled, online or offline as the user chose (tokens are not sent).
ACTOR_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_DATASETS_CACHE",
    "HF_ENDPOINT",
    "TOKENIZERS_PARALLELISM",
    "TQDM_DISABLE",
    "HF_DATASETS_DISABLE_PROGRESS_BARS",
    "TRANSFORMERS_VERBOSITY",
)


class WorkerActor:
    """Runs inside a Ray actor: placed (`placed()` answers at once), then builds the Worker
    (`ready()`, the slow part), then evaluates candidates. The two calls let the driver tell
    an actor that no node can take (placement_timeout) from one that loads (start_timeout)."""

    def __init__(self, spec: WorkerSpec, env: dict[str, str], threads: int) -> None:
        os.environ.update(env)
        self.spec, self.threads = spec, threads
        self.worker: Any = None  # the Worker, once ready() built it

    def placed(self) -> dict[str, Any]:
        import ray

        node = ray.get_runtime_context().get_node_id()
        return {"node": node, "host": socket.gethostname(), "pid": os.getpid()}

    def ready(self) -> dict[str, Any]:
        """Sources resident, tasks built: a bad model or task fails here, at start. Its error
        reaches the driver as itself (the cause of Ray's RayTaskError)."""
        import ray
        import torch

        from evomerge.worker import Worker

        torch.set_num_threads(self.threads)
        self.worker = Worker(self.spec)
        self.worker.scorer("search")
        node = ray.get_runtime_context().get_node_id()
        return {"name": self.worker.name, "node": node, "load_seconds": self.worker.load_seconds}

    def evaluate(
        self, recipe: Recipe, split: str, rung: int | None = None, scored: int | None = None
    ) -> Outcome:
        assert self.worker is not None  # ready() succeeded before any job is sent
        return self.worker.evaluate(recipe, split, rung, scored)


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
    placement_timeout: float = Field(
        120.0,
        gt=0,
        description="seconds the study may go with no worker up because Ray finds no node for "
        "one (nodes lost or busy) before it stops, resumable; at start, each worker's limit. "
        "Raise it for an autoscaling cluster that first adds nodes",
    )
    start_timeout: float = Field(
        900.0,
        gt=0,
        description="seconds a worker placed on a node may take to load its models and tasks "
        "(the time before placement counts against placement_timeout)",
    )


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
        self.placement_timeout = opts.placement_timeout
        self.replaced = 0  # actors lost and replaced
        self.requeued = 0  # jobs sent again after their actor died
        self._queue: deque[Job] = deque()
        self._slots: list[WorkerSlot] = []
        self._by_ref: dict[Any, WorkerSlot] = {}
        self._closed = False
        self._pids: set[int] = set()  # actor processes of a local Ray, for kill_orphans
        self._groups: dict[int, Any] = {}  # id(slot) -> the placement group of a k-GPU worker
        if ray.is_initialized():
            self._owns = "none"  # the caller's Ray: used as is, left as is
        elif self.address:
            check_reachable(self.address)
            with sigterm_as_terminated():
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
            with sigterm_as_terminated():
                # address "local": a new Ray of our own, never one another process started here
                ray.init(
                    address="local",
                    num_cpus=max(1, math.ceil(workers * self.cpus)),
                    include_dashboard=False,
                    log_to_driver=False,
                    object_store_memory=256 * 2**20,
                )
        where = f"the Ray cluster at {self.address}" if self.address else "the local Ray"
        self.watch = ClusterWatch(where if self._owns != "none" else "the Ray cluster")
        try:
            self.gpus = self._gpus(opts.gpus_per_worker)
            self._check_capacity()
            from evomerge.device_map import worker_devices

            device = self._actor_device()
            span = worker_devices(device, int(self.gpus)) if self.gpus > 1 else ()
            self.actor_spec = spec.model_copy(update={"device": device, "devices": span})
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
        if requested > 1 and requested != int(requested):
            raise ConfigError(
                f"executor.gpus_per_worker: {requested:g} (below 1 a worker shares a GPU; above "
                "1 it spans that many whole GPUs: use an integer)"
            )
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
        """A new actor in `slot`; it takes jobs once its placed() and ready() returned."""
        slot.actor = self._remote.options(
            num_cpus=self.cpus,
            num_gpus=self.gpus,
            max_restarts=0,
            max_task_retries=0,
            scheduling_strategy=self._pack(slot) if self.gpus > 1 else "SPREAD",
        ).remote(self.actor_spec, self._env, self.threads)
        slot.placing, slot.starting = slot.actor.placed.remote(), slot.actor.ready.remote()
        slot.job, slot.ref, slot.since = None, None, time.monotonic()
        slot.name = slot.node = ""
        self._by_ref[slot.placing] = self._by_ref[slot.starting] = slot
        return slot

    def _pack(self, slot: WorkerSlot) -> Any:
        """A worker over k GPUs: its own placement group, one bundle of the k GPUs (and its
        CPUs) packed on one node (STRICT_PACK), made afresh when the slot's actor is replaced."""
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        old = self._groups.pop(id(slot), None)
        if old is not None:
            with contextlib.suppress(Exception):  # its node is gone
                remove_placement_group(old)
        bundle = {k: v for k, v in (("GPU", self.gpus), ("CPU", self.cpus)) if v > 0}
        group = placement_group([bundle], strategy="STRICT_PACK")
        self._groups[id(slot)] = group
        return PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=0
        )

    def wait_started(self) -> None:
        """Block until every slot's actor is up (replacements included), or raise a clear error.

        Called at construction, so bad models or tasks fail before the first candidate. Job
        results that arrive meanwhile stay with their refs until the next `wait()`."""
        while not all(s.up for s in self._slots):
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
            for group in self._groups.values():  # a joined cluster keeps them otherwise
                with contextlib.suppress(Exception):
                    ray.util.remove_placement_group(group)
        self._slots = []
        self._by_ref = {}
        self._groups = {}
        if self._owns == "local":
            self._pids |= descendants()  # its GCS, raylet, agents, workers
        if self._owns != "none":
            ray.shutdown()  # stops a local Ray; only disconnects from a joined cluster
        if self._owns == "local":
            kill_orphans(self._pids)  # those whose raylet or GCS died before them

    # -- internals -------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        for slot in self._slots:
            if not self._queue:
                return
            if slot.up and slot.job is None:
                job = self._queue.popleft()
                slot.job = job
                slot.ref = slot.actor.evaluate.remote(job.recipe, job.split, job.rung, job.scored)
                self._by_ref[slot.ref] = slot

    def _wait_any(self, starting_only: bool = False) -> list[Any]:
        """Refs that are done: waits until at least one is, then takes all that are. Waits in
        slices: between them, a lost cluster or an overdue worker raises (ray_health)."""
        import ray

        refs = [
            r for r, s in self._by_ref.items() if not starting_only or r in (s.placing, s.starting)
        ]
        while True:
            # Before each wait, not only after an idle one: workers can go on answering for a
            # while after the GCS is gone (Ray ends the process 60 s later). The results of the
            # previous wait are recorded by now. Cheap: the GCS is asked in a thread.
            self.watch.check()
            ready, _ = ray.wait(refs, num_returns=1, timeout=POLL_SECONDS)
            if ready:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                return ready
            check_deadlines(
                self._slots,
                placement_timeout=self.placement_timeout,
                start_timeout=self.start_timeout,
                every_slot=starting_only,
                need=f"{self.cpus:g} CPU and {self.gpus:g} GPU",
                watch=self.watch,
            )

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
            if ref == slot.placing:
                self._placed(slot, value)
            elif ref == slot.starting:
                if slot.placing is not None:  # both came back in one batch
                    self._placed(slot, {"node": value["node"]})
                    self._by_ref.pop(slot.placing, None)
                slot.starting = None
                slot.name, slot.node = value["name"], value["node"]
            else:
                assert slot.job is not None
                results.append(JobResult(slot.job, value))
                slot.job = None
                slot.ref = None

    def _placed(self, slot: WorkerSlot, where: dict[str, Any]) -> None:
        """The slot's actor runs on a node: from now on it is loading (start_timeout)."""
        slot.placing, slot.node, slot.since = None, where["node"], time.monotonic()
        if self._owns == "local" and "pid" in where:
            self._pids.add(int(where["pid"]))

    def _lost(self, slot: WorkerSlot, exc: BaseException) -> None:
        """The slot's actor is gone: queue its job again, first, and start a new actor."""
        import ray

        if slot.job is not None:
            self._queue.appendleft(slot.job)
            self.requeued += 1
        for ref in (slot.ref, slot.placing, slot.starting):
            self._by_ref.pop(ref, None)
        self.replaced += 1
        if self.replaced > self.max_replacements:
            self.watch.check(fresh=True)  # workers die with their cluster: say that instead
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WorkersLostError(
                f"{self.replaced} Ray workers died (at most {self.max_replacements} are replaced); "
                f"last: {type(exc).__name__}: {first}. Check the nodes' memory (a worker holds "
                "its sources resident; see the README: Ray executor) and the Ray logs"
            ) from exc
        with contextlib.suppress(Exception):  # already dead or its node is gone
            ray.kill(slot.actor, no_restart=True)
        self._start_actor(slot)


LOST = lost_worker_errors()

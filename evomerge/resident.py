"""Source weights kept resident for repeated merges into one live model (the search hot path).

A worker loads every source tensor once, in its file dtype, on its device. Each candidate is
then materialized by running the same TensorTasks as a disk merge and copying the results into
the model's parameters: no disk, no new model object, milliseconds of bookkeeping.

Memory: (M + 1) x P x bytes-per-weight for P parameters and M sources plus a base (e.g. 7B bf16
with 3 sources + base: 4 x 14 GB = 56 GB resident, plus the 14 GB live model). That is the
`device` residency tier; `evomerge.residency` holds the sources on the host or on disk instead,
behind the same `Sources.feed` the merger reads them through.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import Protocol

import torch

from evomerge.checkpoint import CheckpointReader
from evomerge.errors import IncompatibleModelsError
from evomerge.fusion import FusedTask, FusedTensor, fuse_tasks, unit_tasks
from evomerge.merge import run_fused, run_task
from evomerge.plan import OutTensor, TensorTask, build_layout, resolve_task
from evomerge.recipe import Recipe

Loader = Callable[[str, str], torch.Tensor]  # (model, tensor name) -> the tensor as stored


class Sources(Protocol):
    """Where a worker's source tensors live (a residency tier), as the merger reads them."""

    device: torch.device
    compute_dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Host or device bytes the sources hold between candidates."""
        ...

    def feed(
        self, tasks: Sequence[TensorTask], devices: Sequence[torch.device]
    ) -> Generator[Loader, None, None]:
        """One loader per task, in order, serving its sources on devices[i]; a loader is valid
        until the next one is taken."""
        ...


class ResidentSources:
    """All tensors of the source models, in memory on one device (the `device` tier)."""

    tier = "device"

    def __init__(
        self,
        readers: Mapping[str, CheckpointReader],
        *,
        device: str | torch.device = "cpu",
        compute_dtype: torch.dtype = torch.float32,
        placement: Mapping[str, torch.device] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.tensors: dict[tuple[str, str], torch.Tensor] = {}
        where = placement or {}  # tensor name -> its device, for a worker that spans devices
        for model, reader in readers.items():
            for name in reader.names():
                t = reader.get(name, device=where.get(name, self.device))
                if t.device.type == "cpu":
                    # safetensors hands out views of the mmapped file: copy them into process
                    # memory, or every candidate pays page faults, and disk reads once the page
                    # cache drops the file (seen: 3.6 s instead of 0.24 s per merge)
                    t = t.clone()
                self.tensors[(model, name)] = t
            reader.close()  # unmap its files: their pages would count in the RSS beside the copies

    def load(self, model: str, name: str) -> torch.Tensor:
        """The tensor as stored; run_task casts it (per chunk when it can)."""
        return self.tensors[(model, name)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def feed(
        self, tasks: Sequence[TensorTask], devices: Sequence[torch.device]
    ) -> Generator[Loader, None, None]:
        """Everything is resident already: the same loader for every task."""
        for _ in tasks:
            yield self.load


class InPlaceMerger:
    """Writes a recipe's merged tensors into live tensors (a model's parameters). `fusions`
    (evomerge.fusion, in the layout's names) are merged as one tensor each, as on disk."""

    def __init__(
        self,
        targets: Mapping[str, torch.Tensor],
        sources: Sources,
        layout: list[OutTensor],
        fusions: Sequence[FusedTensor] = (),
    ) -> None:
        missing = [o.name for o in layout if o.name not in targets]
        if missing:
            raise IncompatibleModelsError(
                f"the live model has no parameter {missing[0]!r} of the merged layout "
                f"({len(missing)} missing); it was built from a different architecture"
            )
        self.sources = sources
        self.layout = layout
        self.fusions = tuple(fusions)
        self.targets = {o.name: targets[o.name] for o in layout}
        self._cuda = sorted({str(t.device) for t in self.targets.values() if t.is_cuda})

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        recipe: Recipe,
        readers: Mapping[str, CheckpointReader],
        sources: Sources,
    ) -> InPlaceMerger:
        """Targets are the model's own parameters (or views of them where transformers fused
        checkpoint tensors), so merging updates the model directly."""
        from evomerge.architectures import checkpoint_views, live_targets
        from evomerge.fusion import fused_tensors

        layout = build_layout(recipe, readers)
        shapes = {o.name: o.shape for o in layout}
        views = checkpoint_views(model, shapes)
        targets = live_targets(model, shapes, views)
        return cls(targets, sources, layout, fused_tensors(model, views))

    @torch.no_grad()
    def apply(self, recipe: Recipe) -> float:
        """Materialize `recipe` into the targets; returns seconds spent (synchronized on CUDA)."""
        t0 = time.perf_counter()
        units = fuse_tasks(
            [resolve_task(recipe, out) for out in self.layout], self.fusions, recipe.seed
        )
        tasks = [t for u in units for t in unit_tasks(u)]  # a fusion's members side by side
        outs = [self.targets[task.out.name] for task in tasks]
        compute = self.sources.compute_dtype
        # each tensor is merged on the device its parameter lives on, its sources served there
        with contextlib.closing(self.sources.feed(tasks, [o.device for o in outs])) as loaders:
            for unit in units:
                if isinstance(unit, FusedTask):  # one parameter: one device
                    mine = [self.targets[t.out.name] for t in unit.members]
                    loads = itertools.islice(loaders, len(mine))
                    run_fused(unit, loads, mine, device=mine[0].device, compute_dtype=compute)
                else:
                    out = self.targets[unit.out.name]
                    load = next(loaders)
                    run_task(unit, load, device=out.device, compute_dtype=compute, out=out)
        for device in self._cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

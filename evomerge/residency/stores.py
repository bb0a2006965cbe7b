"""The source stores of the `host` and `disk` tiers, and the stager that streams their tensors to
the device while the previous tensor merges (the `device` tier is `resident.ResidentSources`).

A store's `feed(tasks, devices)` yields one loader per task, in order: the loader of task i maps
(model, tensor name) to that source tensor as stored, on `devices[i]`, and stays valid until the
next loader is taken. `resident.InPlaceMerger` runs each task with its loader.

Why a double buffer and not a copy per tensor: the merge of task i reads slab i % 2 while the copy
engine fills the other slab with task i + 1's sources (a CUDA side stream; events order the two:
`ready` before a merge reads a slab, `freed` before a copy overwrites it). The host thread never
waits on the GPU, so the copy stream stays busy and a candidate costs about its bytes over the
link. On the CPU the same code runs with plain synchronous copies (no stream, no events).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass

import torch
from safetensors import safe_open

from evomerge import dtypes
from evomerge.checkpoint import CheckpointReader
from evomerge.errors import CheckpointError
from evomerge.plan import TensorTask
from evomerge.residency import Tier
from evomerge.resident import Loader, ResidentSources, Sources

Key = tuple[str, str]  # (model, tensor name in that model)
Fetch = Callable[[list[Key]], Mapping[Key, torch.Tensor]]
ALIGN = 512  # byte alignment of every tensor inside a slab (any dtype; CUDA's 256 and more)
HOST_SLAB_MIN = 1 << 28  # 256 MiB: host slabs are powers of two, see pack_host


def task_keys(task: TensorTask) -> list[Key]:
    """The source tensors `merge.run_task` loads for `task` (the base once)."""
    keys: list[Key] = []
    if task.base is not None:
        keys.append((task.base, task.out.sources[task.base]))
    for m in task.models:
        key = (m, task.out.sources[m])
        if key not in keys:
            keys.append(key)
    return keys


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def tensor_meta(reader: CheckpointReader, name: str) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype from the header (no weight read); a dtype our table lacks from the tensor."""
    info = reader.infos[name]
    torch_name = dtypes.from_safetensors(info.dtype)
    if torch_name is None:
        return info.shape, reader.get(name).dtype
    return info.shape, getattr(torch, torch_name)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * dtype.itemsize


@dataclass(frozen=True)
class _Place:
    key: Key
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def _views(slab: torch.Tensor, places: Sequence[_Place]) -> dict[Key, torch.Tensor]:
    return {p.key: slab[p.offset : p.offset + p.nbytes].view(p.dtype).view(p.shape) for p in places}


class _Slots:
    """Two staging slabs on one device, and (on CUDA) the copy stream and events that order them."""

    def __init__(self, device: torch.device, capacity: int) -> None:
        self.device = device
        self.capacity = capacity
        self.slabs = [torch.empty(capacity, dtype=torch.uint8, device=device) for _ in range(2)]
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.stream = torch.cuda.Stream(device=device)
            self.ready = [torch.cuda.Event(), torch.cuda.Event()]  # copy into slab k done
            self.freed = [torch.cuda.Event(), torch.cuda.Event()]  # merge reading slab k done

    def fill(
        self, k: int, places: Sequence[_Place], host: Mapping[Key, torch.Tensor]
    ) -> dict[Key, torch.Tensor]:
        """Copy `host` tensors into slab k (asynchronously on CUDA); returns the slab views."""
        views = _views(self.slabs[k], places)
        if not self.cuda:
            for key, view in views.items():
                view.copy_(host[key])
            return views
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.freed[k])  # never recorded yet: no wait
            for key, view in views.items():
                view.copy_(host[key], non_blocking=True)  # pinned host: a DMA, host goes on
            self.ready[k].record(self.stream)
        return views

    def take(self, k: int) -> None:
        """The merge about to read slab k waits (on the GPU, not the host) for its copy."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[k])

    def release(self, k: int) -> None:
        """The merge reading slab k is enqueued: the next copy into it waits for that merge."""
        if self.cuda:
            self.freed[k].record(torch.cuda.current_stream(self.device))


class Stager:
    """Streams each task's source tensors into a device's two slabs, one task ahead."""

    def __init__(self, meta: Callable[[Key], tuple[tuple[int, ...], torch.dtype]]) -> None:
        self.meta = meta
        self.slots: dict[torch.device, _Slots] = {}

    @property
    def device_bytes(self) -> int:
        """Bytes of the staging slabs (device memory beside the live model)."""
        return sum(2 * s.capacity for s in self.slots.values())

    def _places(self, task: TensorTask) -> list[_Place]:
        places, offset = [], 0
        for key in task_keys(task):
            shape, dtype = self.meta(key)
            nbytes = _nbytes(shape, dtype)
            places.append(_Place(key, offset, nbytes, shape, dtype))
            offset += _aligned(nbytes)
        return places

    def _reserve(self, device: torch.device, capacity: int) -> _Slots:
        slots = self.slots.get(device)
        if slots is None or slots.capacity < capacity:
            if slots is not None and slots.cuda:
                torch.cuda.synchronize(device)  # the old slabs may still be read or written
            self.slots[device] = slots = _Slots(device, capacity)
        return slots

    def feed(
        self, tasks: Sequence[TensorTask], devices: Sequence[torch.device], fetch: Fetch
    ) -> Generator[Loader, None, None]:
        """Loaders over the staged tensors; task i + 1 is copied while task i merges."""
        plans = [self._places(t) for t in tasks]
        need: dict[torch.device, int] = {}
        for places, dev in zip(plans, devices, strict=True):
            size = sum(_aligned(p.nbytes) for p in places)
            need[dev] = max(need.get(dev, 0), size)
        slots = {dev: self._reserve(dev, size) for dev, size in need.items()}
        turn = dict.fromkeys(need, 0)

        def stage(i: int) -> tuple[_Slots, int, dict[Key, torch.Tensor]]:
            s = slots[devices[i]]
            k = turn[devices[i]]
            turn[devices[i]] ^= 1
            return s, k, s.fill(k, plans[i], fetch([p.key for p in plans[i]]))

        ahead = stage(0) if tasks else None
        for i in range(len(tasks)):
            assert ahead is not None
            s, k, views = ahead
            ahead = stage(i + 1) if i + 1 < len(tasks) else None
            s.take(k)
            try:
                yield _loader(views)
            finally:  # also when the merge raised: the slab stays ordered behind what was queued
                s.release(k)


def _loader(tensors: Mapping[Key, torch.Tensor]) -> Loader:
    def load(model: str, name: str) -> torch.Tensor:
        return tensors[(model, name)]

    return load


def pack_host(
    readers: Mapping[str, CheckpointReader], *, pin: bool
) -> tuple[dict[Key, torch.Tensor], int]:
    """Every source tensor copied into a few large host slabs; returns views and slab bytes.

    Why slabs: torch's pinned-memory allocator rounds each allocation up to a power of two, so
    pinning tensor by tensor can nearly double the host memory. Slabs of one power-of-two size
    (at least the largest tensor, at least 256 MiB), filled first-fit, lose only their tails."""
    metas = [
        ((model, name), *tensor_meta(reader, name))
        for model, reader in readers.items()
        for name in reader.names()
    ]
    largest = max((_nbytes(shape, dt) for _, shape, dt in metas), default=0)
    cap = max(HOST_SLAB_MIN, 1 << max(0, largest - 1).bit_length())
    fills: list[int] = []
    where: dict[Key, tuple[int, int]] = {}
    for key, shape, dt in metas:
        size = _aligned(_nbytes(shape, dt))
        slab = next((i for i, used in enumerate(fills) if used + size <= cap), len(fills))
        if slab == len(fills):
            fills.append(0)
        where[key] = (slab, fills[slab])
        fills[slab] += size
    slabs = [torch.empty(used, dtype=torch.uint8, pin_memory=pin) for used in fills]
    tensors: dict[Key, torch.Tensor] = {}
    for key, shape, dt in metas:
        slab, offset = where[key]
        view = _views(slabs[slab], [_Place(key, offset, _nbytes(shape, dt), shape, dt)])[key]
        view.copy_(readers[key[0]].get(key[1]))  # out of the mmapped file into process memory
        tensors[key] = view
    for reader in readers.values():
        reader.close()  # unmap the files: their pages would count in the RSS beside the slabs
    return tensors, sum(fills)


class HostSources:
    """`host`: sources in (pinned, for a GPU) host memory, streamed per task to the device."""

    tier: Tier = "host"

    def __init__(
        self,
        readers: Mapping[str, CheckpointReader],
        *,
        device: str | torch.device = "cpu",
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        self.tensors, self.host_bytes = pack_host(readers, pin=pin)
        self.stager = Stager(lambda key: (tuple(self.tensors[key].shape), self.tensors[key].dtype))

    @property
    def nbytes(self) -> int:
        """Host bytes held (slabs); the device holds only `stager.device_bytes`."""
        return self.host_bytes

    def load(self, model: str, name: str) -> torch.Tensor:
        """The host copy of one tensor, as stored."""
        return self.tensors[(model, name)]

    def feed(
        self, tasks: Sequence[TensorTask], devices: Sequence[torch.device]
    ) -> Generator[Loader, None, None]:
        return self.stager.feed(tasks, devices, lambda keys: {k: self.tensors[k] for k in keys})


class DiskSources:
    """`disk`: nothing resident; each task maps its source tensors from their safetensors files
    and unmaps them after the task, so the process holds one task's pages, not the files'."""

    tier: Tier = "disk"
    nbytes = 0  # host bytes held: none (the page cache is the kernel's)

    def __init__(
        self,
        readers: Mapping[str, CheckpointReader],
        *,
        device: str | torch.device = "cpu",
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.readers = dict(readers)
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.meta = {(m, n): tensor_meta(r, n) for m, r in self.readers.items() for n in r.names()}
        self.stager = Stager(self.meta.__getitem__)

    def map(self, keys: list[Key]) -> dict[Key, torch.Tensor]:
        """Views of the files (a fresh mapping per call, gone when the views are dropped).
        A tensor whose file is no safetensors file comes from its reader's `get`: pickled
        checkpoints (--allow-pickle, loaded whole by the reader) and tensors a reader computes
        (token rows re-laid out in another vocabulary, evomerge.vocab)."""
        handles: dict[str, object] = {}
        out: dict[Key, torch.Tensor] = {}
        for model, name in keys:
            reader = self.readers[model]
            info = reader.infos[name]
            if not info.file.endswith(".safetensors"):
                out[(model, name)] = reader.get(name)
                continue
            path = str(reader.path / info.file)
            handle = handles.get(path)
            if handle is None:
                try:
                    handle = handles[path] = safe_open(path, framework="pt")
                except Exception as exc:  # SafetensorError: the file changed since it was opened
                    raise CheckpointError(
                        f"{reader.where}: {path} can no longer be read ({exc})"
                    ) from None
            out[(model, name)] = handle.get_tensor(name)  # type: ignore[attr-defined]
        return out

    def feed(
        self, tasks: Sequence[TensorTask], devices: Sequence[torch.device]
    ) -> Generator[Loader, None, None]:
        if any(d.type != "cpu" for d in devices):  # not host memory: stream through the slabs
            yield from self.stager.feed(tasks, devices, self.map)
            return
        for task in tasks:  # on the CPU the merge reads the mapped pages themselves
            mapped = self.map(task_keys(task))
            yield _loader(mapped)
            del mapped  # unmapped before the next task maps its own


def make_sources(
    tier: Tier,
    readers: Mapping[str, CheckpointReader],
    *,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype = torch.float32,
    placement: Mapping[str, torch.device] | None = None,
) -> Sources:
    """The store of one residency tier (resolved: auto is decided before a worker starts).
    `placement` (tensor name -> device, a worker over several devices) places the device tier's
    copies; the host and disk tiers stream each tensor to its target's device anyway."""
    if tier == "device":
        return ResidentSources(
            readers, device=device, compute_dtype=compute_dtype, placement=placement
        )
    if tier == "host":
        return HostSources(readers, device=device, compute_dtype=compute_dtype)
    if tier == "disk":
        return DiskSources(readers, device=device, compute_dtype=compute_dtype)
    raise ValueError(f"unresolved or unknown residency tier {tier!r}")

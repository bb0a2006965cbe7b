"""The safetensors layout: shards streamed with headers known before any data exists, and
headers read back and checked against the file's size.

The merge plan knows every output name, shape and dtype up front, so each shard's header is
written first and tensors are appended as they are computed: memory stays at one tensor, with no
shard-sized buffer and no second copy (safetensors' `save_file` needs the whole dict at once).

Reading checks a header the way safetensors does, but names the tensor, the offsets and the
sizes: a truncated download or a garbage file is then one user error when a model is opened,
not a Rust exception (or a random bus error) in the middle of a study.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.dtypes import safetensors_code
from evomerge.errors import CheckpointError

#: Bits per element of each safetensors dtype code (the format's table; F4 and F6 pack).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
_MAX_HEADER = 100_000_000  # safetensors refuses larger headers


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a safetensors header declares it."""

    dtype: str  # header code, e.g. 'BF16'
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of a safetensors file, by name (sorted, as `safe_open.keys()`), after checking
    the header against the file's size; reads the header only, never the data.

    Raises CheckpointError naming the file and what is wrong: shorter than its header, a header
    that is no JSON object, offsets that overlap, leave gaps or disagree with shape and dtype,
    and data that ends before (truncated) or after the last tensor.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if n < 0 or n > _MAX_HEADER:
            raise CheckpointError(f"{path} is not a safetensors file ({size} bytes)")
        if 8 + n > size:
            raise CheckpointError(
                f"{path} is truncated or not a safetensors file: its header needs {8 + n} "
                f"bytes and the file has {size}"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(
            f"{path} is not a safetensors file: its {n}-byte header is not JSON"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is no JSON object")
    tensors: dict[str, StoredTensor] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = _entry(path, name, entry)
        bits = DTYPE_BITS.get(dtype)
        if bits is not None:
            want = math.prod(shape) * bits
            if want % 8 or end - begin != want // 8:
                raise CheckpointError(
                    f"{path}: tensor {name!r} ({dtype} {list(shape)}) needs {want / 8:g} bytes "
                    f"but its header gives it {end - begin} (offsets {begin}-{end})"
                )
        tensors[name] = StoredTensor(dtype, shape)
        spans.append((begin, end, name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise CheckpointError(
                f"{path}: the header is corrupt: tensor {name!r} starts at byte {begin} of the "
                f"data, expected {at} (overlapping or missing data)"
            )
        at = end
    data = size - 8 - n
    if at > data:
        raise CheckpointError(
            f"{path} is truncated: its header declares {at} bytes of tensor data, the file holds "
            f"{data} (size {size} bytes, expected {8 + n + at}); download or copy it again"
        )
    if at < data:
        raise CheckpointError(
            f"{path} is corrupt: {data - at} bytes follow the last tensor (size {size} bytes, "
            f"expected {8 + n + at})"
        )
    return dict(sorted(tensors.items()))


def _entry(path: Path, name: str, entry: Any) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """(dtype, shape, offsets) of one header entry, or CheckpointError saying which field is bad."""
    ok = isinstance(entry, dict)
    dtype = entry.get("dtype") if ok else None
    shape = entry.get("shape") if ok else None
    offsets = entry.get("data_offsets") if ok else None
    ints = (
        isinstance(shape, list)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape + offsets)
    )
    if not isinstance(dtype, str) or not ints or offsets[0] > offsets[1]:
        raise CheckpointError(
            f"{path}: the header is corrupt: tensor {name!r} has no valid dtype, shape and "
            f"data_offsets ({json.dumps(entry)[:120]})"
        )
    return dtype, tuple(shape), (offsets[0], offsets[1])


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def assign_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors grouped into shards of at most max_shard_bytes (a bigger tensor alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


class ShardStream:
    """One open shard: header written at creation, tensors appended in the declared order."""

    def __init__(self, path: Path, specs: Sequence[TensorSpec]) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for s in specs:
            header[s.name] = {
                "dtype": safetensors_code(s.dtype),
                "shape": list(s.shape),
                "data_offsets": [offset, offset + s.nbytes],
            }
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._expected = list(specs)
        self._next = 0
        self._fh = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._fh.write(len(raw).to_bytes(8, "little"))
        self._fh.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._expected[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(
                f"shard stream expected {spec.name} {spec.shape} {spec.dtype}, got {name} "
                f"{tuple(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._fh.write(memoryview(data))
        self._next += 1

    @property
    def done(self) -> bool:
        return self._next == len(self._expected)

    def close(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def abort(self) -> None:
        """Close after a failed write (a full disk): the file's space comes back once the
        caller removes it, not when the garbage collector gets to a traceback's frames."""
        import contextlib

        with contextlib.suppress(OSError):  # its flush fails again; the file closes all the same
            self._fh.close()


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class BackgroundWriter:
    """Runs shard writes on one thread, in order, while the caller computes the next tensors.

    Why: writing into the page cache is a kernel memcpy at about 1 GB/s here, as long as the
    merge of a linear recipe itself; overlapped, the two costs no longer add up. At most
    `depth` writes wait, so memory stays at a few tensors. An error in a write is raised by the
    next `write`/`close`/`finish` call.
    """

    def __init__(self, depth: int = 2) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evomerge-writer")
        self._pending: list[Any] = []
        self._depth = depth

    def write(self, stream: ShardStream, name: str, tensor: torch.Tensor) -> None:
        self._submit(stream.write, name, tensor)

    def close(self, stream: ShardStream) -> None:
        self._submit(stream.close)

    def _submit(self, fn: Any, *args: Any) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self._depth:
            self._pending.pop(0).result()

    def finish(self) -> None:
        """Wait for every write; raise the first error."""
        try:
            for fut in self._pending:
                fut.result()
        finally:
            self._pending.clear()
            self._pool.shutdown(wait=True)

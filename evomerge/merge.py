"""Materialize a Recipe: streaming to disk (export, `evomerge merge`) or in place (search).

Both paths run the same TensorTask through the same method function, so a candidate scored in
memory and the checkpoint exported for it hold the same numbers; checkpoint tensors that make up
one live tensor (a layer's MoE experts) run as one FusedTask over their stack (evomerge.fusion).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from evomerge.checkpoint import SIDE_FILES, CheckpointReader, parse_dtype, stored_float_dtype
from evomerge.disk_full import disk_full_cause, no_space
from evomerge.errors import ConfigError
from evomerge.fusion import FusedTask, plan_units, unit_tasks
from evomerge.methods.base import MergeInput
from evomerge.plan import TensorTask, open_readers, plan_merge
from evomerge.recipe import Recipe
from evomerge.safetensors_stream import (
    BackgroundWriter,
    ShardStream,
    TensorSpec,
    assign_shards,
    shard_names,
)
from evomerge.vocab import write_tokenizer
from evomerge.weighted_sum import weighted_sum_into


def run_task(
    task: TensorTask,
    load: Callable[[str, str], torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge one tensor, into `out` when given (then returned), else into a new tensor.

    `load(model, tensor_name)` returns the source tensor as stored (any dtype). Weighted-sum
    methods run the fused kernel (converting per chunk); the others get whole tensors cast to
    `compute_dtype`.
    """
    name = task.out.name
    base = load(task.base, task.out.sources[task.base]) if task.base is not None else None
    tensors = [load(m, task.out.sources[m]) for m in task.models]
    if task.method.coefficients is not None:
        c_base, cs = task.method.coefficients(task.model_params, task.global_params)
        sources, coefficients = list(tensors), list(cs)
        if base is not None and c_base != 0:
            sources.insert(0, base)
            coefficients.insert(0, c_base)
        if out is None:
            out = torch.empty(task.out.shape, dtype=compute_dtype, device=device)
        return weighted_sum_into(out, sources, coefficients, compute_dtype=compute_dtype)
    gen = None
    if task.method.randomized:
        gen = torch.Generator(device=device)
        gen.manual_seed(task.seed)
    merged = _merge_one(
        task,
        base.to(compute_dtype) if base is not None else None,
        [t.to(compute_dtype) for t in tensors],
        gen,
        name,
    )
    if out is None:
        return merged
    out.copy_(merged)
    return out


def run_fused(
    unit: FusedTask,
    loads: Iterable[Callable[[str, str], torch.Tensor]],
    outs: Sequence[torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype = torch.float32,
) -> None:
    """Merge a fusion's members as the one tensor they make up, into `outs` (one per member).

    Each model's members are copied into a stack of the fused tensor's layout (`loads`: one
    loader per member, in order, each read only until the next is taken, as `Sources.feed`
    serves them), the stacks merged as one tensor, and the result split back.
    """
    task = unit.task
    models = list(dict.fromkeys([task.base, *task.models] if task.base else task.models))
    stacks = {m: torch.empty(unit.fused.shape, dtype=compute_dtype, device=device) for m in models}
    pieces = {m: unit.fused.pieces(s) for m, s in stacks.items()}
    for i, (member, load) in enumerate(zip(unit.members, loads, strict=True)):
        for m in models:
            pieces[m][i].copy_(load(m, member.out.sources[m]))
    merged = run_task(task, lambda m, _: stacks[m], device=device, compute_dtype=compute_dtype)
    stacks.clear()  # the sources' stacks go before the pieces are copied out
    pieces.clear()
    for out, piece in zip(outs, unit.fused.pieces(merged.contiguous()), strict=True):
        out.copy_(piece)


def _merge_one(
    task: TensorTask,
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    gen: torch.Generator | None,
    name: str,
) -> torch.Tensor:
    inp = MergeInput(base, tensors, task.model_params, task.global_params, generator=gen, name=name)
    return task.method.merge(inp)


@dataclass(frozen=True)
class MergeStats:
    tensors: int
    bytes_written: int
    seconds: float
    out_dir: Path


class MergeSettings(BaseModel):
    """How `merge_to_disk` writes one merge: the flags of `evomerge merge`, and export's choices."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)
    out_dir: Path = Field(description="output folder, written atomically (temp folder, rename)")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    dtype: str | None = Field(
        None, description="output dtype; none = the recipe's, else each tensor's source dtype"
    )
    compute_dtype: torch.dtype = Field(torch.float32, description="dtype the methods compute in")
    max_shard_bytes: int = Field(
        5 * 2**30, description="largest safetensors shard (a bigger tensor alone)"
    )
    allow_pickle: bool = Field(False, description="load pickled .bin/.pt checkpoints")
    overwrite: bool = Field(False, description="replace a non-empty out_dir (--force)")
    progress: bool = Field(True, description="a progress bar on a terminal")


def output_dtype(recipe: Recipe, override: str | None) -> torch.dtype | None:
    """--dtype beats the recipe's dtype; None keeps each tensor's source dtype."""
    return parse_dtype(override or recipe.dtype)


def _source_dtype(readers: Mapping[str, CheckpointReader], task: TensorTask) -> torch.dtype:
    ref_model = task.base or task.models[0]
    return stored_float_dtype(readers[ref_model].infos[task.out.sources[ref_model]].dtype)


def merge_to_disk(
    recipe: Recipe,
    settings: MergeSettings,
    *,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> MergeStats:
    """Stream the merge into `settings.out_dir`: one tensor per source in memory, written
    atomically, with `extra_files` (text, or bytes such as plots; names may nest) beside it.

    All validation happens in planning, before anything is created under the output folder.
    """
    t0 = time.perf_counter()
    out = settings.out_dir.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not settings.overwrite:
        raise ConfigError(
            f"--out {out} exists and is not empty; choose another folder or pass --force"
        )
    device = settings.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    readers = open_readers(recipe, allow_pickle=settings.allow_pickle)
    # a fusion's members side by side: merged together (evomerge.fusion), written in turn
    units = plan_units(plan_merge(recipe, readers), readers, recipe.reference_model, recipe.seed)
    tasks = [t for u in units for t in unit_tasks(u)]
    out_dtype = output_dtype(recipe, settings.dtype)
    specs = [
        TensorSpec(t.out.name, t.out.shape, out_dtype or _source_dtype(readers, t)) for t in tasks
    ]
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        total = _write_shards(tmp, out.name, units, specs, readers, settings)
        ref = readers[recipe.reference_model].path
        for n in SIDE_FILES:
            if (ref / n).exists():
                shutil.copy2(ref / n, tmp / n)
        write_tokenizer(tmp, readers)  # the output vocabulary's, when the rows were re-laid out
        _fix_config(tmp, recipe, tasks, out_dtype)
        for name, content in (extra_files or {}).items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        _replace_dir(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written checkpoint, and the space back
        full = disk_full_cause(exc)
        if full is None:
            raise
        size = sum(s.nbytes for s in specs) / 1e6
        raise no_space(
            out,
            full,
            writing=f"the checkpoint to {out} ({size:.1f} MB of tensors)",
            hint=f"free space there or choose another --out, then run it again ({out} is as it was)",
        ) from exc
    return MergeStats(len(tasks), total, time.perf_counter() - t0, out)


def _write_shards(
    folder: Path,
    label: str,
    units: list[TensorTask | FusedTask],
    specs: list[TensorSpec],
    readers: Mapping[str, CheckpointReader],
    settings: MergeSettings,
) -> int:
    """Merge every tensor into its shard (writes overlapped with the next merges); the index
    file when there are several shards. Returns the bytes of tensor data written. A fusion is
    merged at its first member, its other members held until their turn (they come next)."""
    device = settings.device
    compute = settings.compute_dtype
    tasks = [t for u in units for t in unit_tasks(u)]
    fusion = {t.out.name: u for u in units if isinstance(u, FusedTask) for t in u.members}
    dtypes = {s.name: s.dtype for s in specs}
    held: dict[str, torch.Tensor] = {}  # a fusion's merged members not yet written
    shards = assign_shards(specs, settings.max_shard_bytes)
    names = shard_names(len(shards))
    writer = BackgroundWriter()
    streams: list[ShardStream] = []

    def load(model: str, name: str) -> torch.Tensor:
        return readers[model].get(name, device=device)

    def merge(task: TensorTask, spec: TensorSpec) -> torch.Tensor:
        unit = fusion.get(spec.name)
        if unit is None:
            out_t = torch.empty(spec.shape, dtype=spec.dtype, device=device)
            return run_task(task, load, device=device, compute_dtype=compute, out=out_t)
        if spec.name not in held:
            outs = [
                torch.empty(m.out.shape, dtype=dtypes[m.out.name], device=device)
                for m in unit.members
            ]
            run_fused(
                unit, itertools.repeat(load, len(outs)), outs, device=device, compute_dtype=compute
            )
            held.update(zip((m.out.name for m in unit.members), outs, strict=True))
        return held.pop(spec.name)

    try:
        bar = _progress(settings.progress, len(tasks), f"merging into {label}")
        i = 0
        total = 0
        for shard_specs, fname in zip(shards, names, strict=True):
            stream = ShardStream(folder / fname, shard_specs)
            streams.append(stream)
            for spec in shard_specs:
                merged = merge(tasks[i], spec)
                writer.write(stream, spec.name, merged)
                total += spec.nbytes
                i += 1
                bar(1)
            writer.close(stream)
        writer.finish()
        bar(0, done=True)
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            writer.finish()
        for s in streams:  # closed now, so a full disk gets its space back with the temp folder
            s.abort()
        raise
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {
                s.name: fname for ss, fname in zip(shards, names, strict=True) for s in ss
            },
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def _fix_config(
    folder: Path, recipe: Recipe, tasks: list[TensorTask], out_dtype: torch.dtype | None
) -> None:
    """config.json must state the merged layer count and dtype, or from_pretrained misloads it."""
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        return
    cfg = json.loads(cfg_path.read_text())
    if recipe.slices:
        cfg["num_hidden_layers"] = sum(s.length for s in recipe.slices)
    if out_dtype is not None:
        name = str(out_dtype).removeprefix("torch.")
        if "dtype" in cfg or "torch_dtype" not in cfg:
            cfg["dtype"] = name
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = name
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _progress(enabled: bool, total: int, label: str) -> Callable[..., None]:
    """A rich progress bar on a terminal; a no-op otherwise (tests, pipes)."""
    import sys

    if not enabled or not sys.stderr.isatty():
        return lambda n=1, done=False: None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    prog = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=False,
    )
    prog.start()
    tid = prog.add_task(label, total=total)

    def step(n: int = 1, done: bool = False) -> None:
        prog.advance(tid, n)
        if done:
            prog.stop()

    return step

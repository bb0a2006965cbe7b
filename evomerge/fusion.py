"""Checkpoint tensors that transformers holds as one live tensor, merged as that one tensor.

Mixtral's and Qwen3-MoE's checkpoints (transformers' saved layout) hold one tensor per expert
(`...experts.3.w1.weight`), while transformers keeps a layer's experts fused in one 3-D parameter
(`...mlp.experts.gate_up_proj`: the experts stacked, gate and up concatenated). mergekit 0.1.5
reads such checkpoints in that fused layout and merges the fused tensors. For a weighted sum that
changes nothing, but a method with a statistic over its tensor (TIES' top-k and sign election,
breadcrumbs' cut, model_stock's and slerp's angles, DELLA's ranks) then sees all of a layer's
experts, gate and up together. So the checkpoint tensors of one live tensor (a `FusedTensor`,
found by `architectures.checkpoint_views` from transformers' own conversion, nothing named by
hand) are stacked into that live tensor's layout, merged as one task, and split back into the
checkpoint's tensors: the disk merge and the in-place merge (which writes the pieces into the live
parameter's views) both give mergekit's fused merge.

Element-wise methods (weighted sums, which have `coefficients`, and those marked `elementwise`)
keep their per-tensor path: element by element the numbers are the same, and they need no stack. Members that resolve to different methods or values
(a filter that tells `w1` from `w3`) are merged tensor by tensor, as written. Memory: one fused
tensor at a time, each source's stack in the compute dtype (Mixtral 8x7B's `gate_up_proj`:
0.94 G elements, 3.8 GB in float32 per model), plus what the method allocates for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from evomerge.architectures import View, checkpoint_views
from evomerge.checkpoint import CheckpointReader, with_layer_index
from evomerge.plan import OutTensor, TensorTask, tensor_seed

Part = tuple[str, tuple[int, ...], tuple[int, ...], int]  # checkpoint name, sizes, strides, offset


@dataclass(frozen=True)
class FusedTensor:
    """A live tensor that several checkpoint tensors make up, and where each lies in it."""

    name: str  # the live parameter's name (transformers' in-memory layout)
    shape: tuple[int, ...]
    parts: tuple[Part, ...]  # views of a contiguous tensor of `shape`, together covering it once

    def pieces(self, fused: torch.Tensor) -> list[torch.Tensor]:
        """The parts as views of `fused` (contiguous, of `shape`), in part order."""
        assert fused.is_contiguous() and tuple(fused.shape) == self.shape, self.name
        at = fused.storage_offset()
        return [fused.as_strided(size, stride, at + off) for _, size, stride, off in self.parts]


@dataclass(frozen=True)
class FusedTask:
    """The members' tasks merged as one over their fused stack."""

    fused: FusedTensor
    task: TensorTask  # the merge of the stack: named and shaped as the fused tensor
    members: tuple[TensorTask, ...]  # one per part, in part order


Unit = TensorTask | FusedTask


def unit_tasks(unit: Unit) -> tuple[TensorTask, ...]:
    """The per-tensor tasks a unit writes (and whose sources it reads), in order."""
    return unit.members if isinstance(unit, FusedTask) else (unit,)


def fused_tensors(model: torch.nn.Module, views: Mapping[str, View]) -> tuple[FusedTensor, ...]:
    """The live tensors of `model` that two or more of the checkpoint tensors in `views`
    (architectures.checkpoint_views) tile exactly; a renamed tensor (one view) is none."""
    live = model.state_dict(keep_vars=True)
    groups: dict[str, list[Part]] = {}
    for name, (live_name, size, stride, offset) in views.items():
        groups.setdefault(live_name, []).append((name, size, stride, offset))
    tiles: dict[tuple[Any, ...], bool] = {}  # layers of one structure are checked once
    out = []
    for live_name, parts in groups.items():
        if len(parts) < 2:
            continue
        shape = tuple(live[live_name].shape)
        key = (shape, tuple(p[1:] for p in parts))
        if key not in tiles:
            tiles[key] = _tile(shape, [p[1:] for p in parts])
        if tiles[key]:
            out.append(FusedTensor(live_name, shape, tuple(parts)))
    return tuple(out)


def _tile(shape: tuple[int, ...], views: Sequence[tuple[Any, ...]]) -> bool:
    """Whether the strided views cover each element of a contiguous `shape` exactly once."""
    numel = math.prod(shape)
    if sum(math.prod(size) for size, _, _ in views) != numel:
        return False
    cover = torch.zeros(numel, dtype=torch.uint8)
    for size, stride, offset in views:
        if 0 in stride:  # a view that repeats elements
            return False
        cover.as_strided(size, stride, offset).add_(1)
    return bool((cover == 1).all())


def checkpoint_fusions(reader: CheckpointReader) -> tuple[FusedTensor, ...]:
    """The fused tensors of `reader`'s checkpoint, found on the architecture built on the meta
    device from its config.json; none when transformers converts none of its tensors."""
    model = _meta_model(reader.config)
    if model is None:
        return ()
    layout = {n: tuple(i.shape) for n, i in reader.infos.items()}
    return fused_tensors(model, checkpoint_views(model, layout))


def largest_fused(config: Mapping[str, Any]) -> int:
    """Elements of the largest live tensor of an architecture whose checkpoint tensors
    transformers converts (0 for the others): the largest tensor one merge task may stack
    (evomerge.memory_plan), read from the meta-device model without probing it."""
    model = _meta_model(config)
    if model is None:
        return 0
    return max((t.numel() for t in model.state_dict().values()), default=0)


def _meta_model(config: Mapping[str, Any]) -> torch.nn.Module | None:
    """The architecture of `config` on the meta device, when transformers has a weight
    conversion for it (else its checkpoint tensors are its live ones and no model is built)."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return None
    import transformers
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    text = config.get("text_config")
    keys = [model_type, *(config.get("architectures") or [])]
    if isinstance(text, Mapping) and isinstance(text.get("model_type"), str):
        keys.append(text["model_type"])
    if all(get_checkpoint_conversion_mapping(k) is None for k in keys):
        return None
    try:
        cfg = transformers.CONFIG_MAPPING[model_type].from_dict(dict(config))
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(cfg)
    except Exception:  # an architecture transformers cannot build: merged tensor by tensor
        return None


def fuse_layout(
    layout: Sequence[OutTensor], fusions: Sequence[FusedTensor]
) -> tuple[FusedTensor, ...]:
    """The reference checkpoint's fusions as the output's: the output tensors of one block
    whose sources are all the parts of one fusion (a frankenmerge takes a block whole) make up
    that fusion, in that block and under the output's names."""
    where = {p[0]: (k, i) for k, f in enumerate(fusions) for i, p in enumerate(f.parts)}
    found: dict[tuple[int, int | None], dict[int, str]] = {}
    for out in layout:
        hit = where.get(next(iter(out.sources.values()), ""))
        if hit is not None:
            found.setdefault((hit[0], out.layer), {})[hit[1]] = out.name
    result = []
    for (k, layer), names in found.items():
        f = fusions[k]
        if len(names) == len(f.parts):
            name = f.name if layer is None else with_layer_index(f.name, layer)
            parts = tuple((names[i], *p[1:]) for i, p in enumerate(f.parts))
            result.append(FusedTensor(name, f.shape, parts))
    return tuple(result)


def _elementwise(task: TensorTask) -> bool:
    return task.method.coefficients is not None or task.method.elementwise


def _resolved(task: TensorTask) -> tuple[Any, ...]:
    return (task.method.name, task.base, task.models, task.model_params, task.global_params)


def fuse_tasks(
    tasks: Sequence[TensorTask], fusions: Sequence[FusedTensor], seed: int
) -> list[Unit]:
    """`tasks` in order, each fusion's members replaced by one FusedTask at its first member's
    place, where the members agree on method and values and the method is not element-wise.
    `seed` (the recipe's) seeds a fused task's randomness by the fused tensor's name."""
    by_name = {t.out.name: t for t in tasks}
    order = {t.out.name: i for i, t in enumerate(tasks)}
    lead_of: dict[str, FusedTask] = {}
    fused: set[str] = set()
    for f in fusions:
        members = [by_name.get(p[0]) for p in f.parts]
        if any(m is None for m in members):
            continue
        ms = tuple(m for m in members if m is not None)
        lead = ms[0]
        if _elementwise(lead) or any(_resolved(m) != _resolved(lead) for m in ms):
            continue
        out = replace(
            lead.out, name=f.name, shape=f.shape, sources=dict.fromkeys(lead.out.sources, f.name)
        )
        unit = FusedTask(f, replace(lead, out=out, seed=tensor_seed(seed, f.name)), ms)
        lead_of[min((m.out.name for m in ms), key=order.__getitem__)] = unit
        fused.update(m.out.name for m in ms)
    units: list[Unit] = []
    for t in tasks:
        if t.out.name in lead_of:
            units.append(lead_of[t.out.name])
        elif t.out.name not in fused:
            units.append(t)
    return units


def plan_units(
    tasks: Sequence[TensorTask], readers: Mapping[str, CheckpointReader], reference: str, seed: int
) -> list[Unit]:
    """The disk merge's units: `tasks` (plan_merge) with the reference checkpoint's fusions
    fused. Only element-wise methods: the tasks as they are, without importing transformers
    (about 3 s here, most of a small model's merge)."""
    if all(_elementwise(t) for t in tasks):
        return list(tasks)
    fusions = fuse_layout([t.out for t in tasks], checkpoint_fusions(readers[reference]))
    return fuse_tasks(tasks, fusions, seed)

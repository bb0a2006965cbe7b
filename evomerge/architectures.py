"""Checkpoint tensors <-> the live model's memory, for any architecture transformers loads.

Merges are planned and computed on the checkpoint's own tensor names (mergekit's and the disk
merge's), but the search writes each merged tensor into a live model, and transformers 5 does not
keep every checkpoint tensor as one parameter of the same name: GPT-NeoX's `embed_out.weight` is
the parameter `lm_head.weight`; Mixtral's and Qwen3-MoE's per-expert tensors
(`...experts.3.w1.weight`) are slices of one fused 3-D parameter per layer
(`...mlp.experts.gate_up_proj`: the experts stacked, gate and up concatenated).

`live_targets` finds, for every checkpoint tensor, the view of live memory that transformers
loaded it into, so the in-place merge writes straight there; `checkpoint_views` are the same
views as (live name, sizes, strides, offset), from which `evomerge.fusion` finds the checkpoint
tensors that make up one live tensor (a layer's experts), merged as that one tensor.
Where names differ it asks transformers itself: `revert_weight_conversion` (what
`save_pretrained` uses to go from live parameters back to checkpoint tensors) is run on a probe,
the live parameters filled with their element indices, so each checkpoint tensor comes back as
the indices it occupies; those are read as a strided view (offset, sizes, strides), checked
element by element. Layers of one structure are probed once and the views reused; the probe
holds one layer's converted parameters as int32 indices for a moment (Mixtral 8x7B: 1.4 G
elements, 5.6 GB of host memory, once per worker), and nothing after.

`outside_sides` places the tensors outside the blocks before or after them in the
architecture's own module order, as mergekit's architecture files list `pre_weights` and
`post_weights`: a frankenmerge takes the first from its first slice, the rest from its last.

`fit_tensor_groups` (evomerge.space) uses `role_filter` so that a preset's attention group
(`self_attn`) means the attention modules of GPT-2 (`attn`) or GPT-NeoX (`attention`) too.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch

from evomerge.checkpoint import layer_index, layer_suffix, with_layer_index
from evomerge.errors import IncompatibleModelsError

View = tuple[str, tuple[int, ...], tuple[int, ...], int]  # live name, sizes, strides, offset
Side = Literal["pre", "post"]


def live_targets(
    model: torch.nn.Module,
    layout: Mapping[str, tuple[int, ...]],
    views: Mapping[str, View] | None = None,
) -> dict[str, torch.Tensor]:
    """For each checkpoint tensor (`layout`: name -> shape), the live tensor or view of a live
    parameter that holds it (`views`: checkpoint_views, when already found). Raises
    IncompatibleModelsError for a tensor found nowhere."""
    live = model.state_dict(keep_vars=True)
    if views is None:
        views = checkpoint_views(model, layout)
    targets: dict[str, torch.Tensor] = {}
    for name, shape in layout.items():
        t = live.get(name)
        if t is not None and tuple(t.shape) == tuple(shape):
            targets[name] = t
        elif name in views:
            live_name, size, stride, offset = views[name]
            p = live[live_name]
            targets[name] = p.as_strided(size, stride, p.storage_offset() + offset)
    missing = [n for n in layout if n not in targets]
    if missing:
        raise IncompatibleModelsError(
            f"the live model has no parameter {missing[0]!r} of the merged layout "
            f"({len(missing)} missing), and transformers' weight conversion maps no parameter to "
            "it; the live model was built from a different architecture"
        )
    return targets


def checkpoint_views(
    model: torch.nn.Module, layout: Mapping[str, tuple[int, ...]]
) -> dict[str, View]:
    """Where transformers holds each checkpoint tensor (`layout`: name -> shape) that is no
    live tensor of its own name and shape: a view of one live parameter. Tensors found nowhere
    are left out. `model` may live on the meta device (only shapes are read)."""
    live = model.state_dict(keep_vars=True)
    pending: dict[str, tuple[int, ...]] = {}
    for name, shape in layout.items():
        t = live.get(name)
        if t is None or tuple(t.shape) != tuple(shape):
            pending[name] = tuple(shape)
    if not pending:
        return {}
    unclaimed = {n: t for n, t in live.items() if n not in layout or n in pending}
    return _probe_views(model, unclaimed, pending)


def _probe_views(
    model: torch.nn.Module,
    unclaimed: Mapping[str, torch.Tensor],
    pending: Mapping[str, tuple[int, ...]],
) -> dict[str, View]:
    """Views for the pending checkpoint tensors, probing the unclaimed parameters one layer
    (or the tensors outside the blocks) at a time; a layer shaped like an earlier one reuses its
    views with the layer index changed."""
    groups: dict[int | None, dict[str, torch.Tensor]] = {}
    for n, t in unclaimed.items():
        groups.setdefault(layer_index(n), {})[n] = t
    views: dict[str, View] = {}
    known: dict[tuple[Any, ...], dict[str, View]] = {}  # a layer's structure -> its views
    for layer, params in groups.items():
        key = _structure(params)
        if layer is not None and key in known:
            found = {
                with_layer_index(d, layer): (with_layer_index(v[0], layer), *v[1:])
                for d, v in known[key].items()
            }
            if all(d in pending and v[0] in params for d, v in found.items()):
                views.update(found)
                continue
        found = _probe(model, params, pending)
        views.update(found)
        if layer is not None:
            known[key] = found
    return views


def _structure(params: Mapping[str, torch.Tensor]) -> tuple[Any, ...]:
    """What two layers share when one conversion applies to both: kinds and shapes."""
    return tuple(sorted((layer_suffix(n) or n, tuple(t.shape)) for n, t in params.items()))


def _probe(
    model: torch.nn.Module,
    params: Mapping[str, torch.Tensor],
    pending: Mapping[str, tuple[int, ...]],
) -> dict[str, View]:
    """Run transformers' live -> checkpoint conversion on index-filled copies of `params` and
    read each pending checkpoint tensor that comes back as a view of one parameter."""
    from transformers.core_model_loading import revert_weight_conversion

    total = sum(t.numel() for t in params.values())
    dtype = torch.int32 if total < 2**31 else torch.int64
    probe: dict[str, torch.Tensor] = {}
    starts: list[tuple[int, int, str]] = []
    offset = 0
    for n, t in params.items():
        probe[n] = torch.arange(offset, offset + t.numel(), dtype=dtype).view(t.shape)
        starts.append((offset, offset + t.numel(), n))
        offset += t.numel()
    converted = revert_weight_conversion(model, probe)
    views: dict[str, View] = {}
    for disk, idx in converted.items():
        if disk not in pending or tuple(idx.shape) != pending[disk] or idx.numel() == 0:
            continue
        first = int(idx.reshape(-1)[0])
        start, end, live_name = next(s for s in starts if s[0] <= first < s[1])
        view = _as_view(idx, start, end - start)
        if view is None:
            raise IncompatibleModelsError(
                f"checkpoint tensor {disk!r} is no strided slice of one live parameter after "
                "transformers' weight conversion (it starts in "
                f"{live_name!r}); the in-place merge cannot write it"
            )
        views[disk] = (live_name, *view)
    return views


def _as_view(
    idx: torch.Tensor, start: int, numel: int
) -> tuple[tuple[int, ...], tuple[int, ...], int] | None:
    """(sizes, strides, offset) of the strided view of the contiguous parameter holding indices
    start .. start + numel - 1 whose elements are `idx`, or None when no such view has them
    (every element is checked, so a view found is exact)."""
    size = tuple(idx.shape)
    first = int(idx.reshape(-1)[0])
    stride = []
    for d, n in enumerate(size):
        step = [0] * len(size)
        step[d] = 1
        stride.append(int(idx[tuple(step)]) - first if n > 1 else 1)
    offset = first - start
    last = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True))
    if min(stride) < 0 or offset < 0 or last >= numel:
        return None
    expected = torch.full((), first, dtype=idx.dtype)
    for d, (n, st) in enumerate(zip(size, stride, strict=True)):
        shape = [1] * len(size)
        shape[d] = n
        expected = expected + (torch.arange(n, dtype=idx.dtype) * st).view(shape)
    if not torch.equal(expected.expand(size), idx):
        return None
    return size, tuple(stride), offset


# What each architecture calls a block's attention and MLP modules (the first name after the
# block index): Llama-style `self_attn`/`mlp`, GPT-2 `attn`, GPT-NeoX `attention`, Mixtral's
# checkpoints `block_sparse_moe`, Falcon `self_attention`, others `feed_forward`/`ffn`.
ROLES: dict[str, tuple[str, ...]] = {
    "attention": ("self_attn", "attn", "attention", "self_attention"),
    "MLP": ("mlp", "block_sparse_moe", "feed_forward", "ffn"),
}


def block_modules(names: Iterable[str]) -> set[str]:
    """The first module name inside the blocks ('model.layers.0.self_attn.q_proj.weight' ->
    'self_attn') over all tensor names."""
    out = set()
    for n in names:
        suffix = layer_suffix(n)
        if suffix:
            out.add(suffix.lstrip(".").split(".")[0])
    return out


def role_filter(filter_: str, names: Iterable[str]) -> tuple[str, str] | None:
    """For a filter that is a role's usual name (`self_attn`, `mlp`, ...) and matches no tensor
    of these models, the filter that names that role in their architecture (`.attn.` for GPT-2)
    and the role; None when the filter matches or no equivalent exists."""
    names = list(names)
    if any(filter_ in n for n in names):
        return None
    modules = block_modules(names)
    for role, aliases in ROLES.items():
        if filter_ in aliases:
            own = next((a for a in aliases if a in modules), None)
            return (f".{own}.", role) if own is not None else None
    return None


def outside_sides(config: Mapping[str, Any], names: Iterable[str]) -> dict[str, Side]:
    """For each of `names` outside the blocks, "pre" when the architecture holds it before its
    first block (embeddings; GPT-2's `wte` and `wpe` too) and "post" after the last (final norm,
    lm_head): mergekit's pre- and post-block weights, read from the state dict of the model
    built on the meta device from `config` (config.json), its names turned into checkpoint
    names by transformers' own conversion (GPT-NeoX's live `lm_head` is `embed_out` on disk).
    A checkpoint may drop the base model's prefix (`wte.weight` for `transformer.wte.weight`).
    A tensor the model lacks, or every one when transformers cannot build the architecture,
    is "pre", as mergekit's inferred architectures take every such tensor from the first
    slice."""
    order = _outside_order(json.dumps(dict(config), sort_keys=True, default=str))
    prefix, known = order if order is not None else ("", {})
    out: dict[str, Side] = {}
    for n in names:
        if layer_index(n) is None:
            out[n] = known.get(n) or known.get(f"{prefix}.{n}") or "pre"
    return out


@functools.lru_cache(maxsize=8)
def _outside_order(config_json: str) -> tuple[str, dict[str, Side]] | None:
    """(base_model_prefix, checkpoint name -> side) of the tensors outside the blocks; None
    when transformers cannot build the architecture (cached: a layout asks once per config).
    The dict is shared by every caller: read it, never change it."""
    try:
        import transformers
        from transformers.core_model_loading import revert_weight_conversion

        cfg = json.loads(config_json)
        config = transformers.CONFIG_MAPPING[cfg["model_type"]].from_dict(cfg)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception:  # an architecture transformers cannot build (remote code, no model_type)
        return None
    state = model.state_dict()
    blocks = [i for i, n in enumerate(state) if layer_index(n) is not None]
    if not blocks:
        return None
    sides: dict[str, Side] = {}
    for i, (n, t) in enumerate(state.items()):
        if layer_index(n) is not None:
            continue
        side: Side = "pre" if i < blocks[0] else "post"
        try:
            disk = list(revert_weight_conversion(model, {n: t}))
        except Exception:  # a conversion that needs more than this one tensor: its live name
            disk = [n]
        for d in disk:
            sides.setdefault(d, side)
    return getattr(model, "base_model_prefix", "") or "", sides

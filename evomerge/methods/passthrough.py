"""Passthrough: one model's tensor, optionally scaled (mergekit `passthrough`)."""

from __future__ import annotations

from torch import Tensor

from evomerge.methods.base import MergeInput, MergeMethod, Param


def passthrough_merge(tensor: Tensor, scale: float = 1.0) -> Tensor:
    """x * scale. With scale 1 the input itself comes back (no copy): callers must not mutate it."""
    return tensor if scale == 1.0 else tensor * scale


def _merge(inp: MergeInput) -> Tensor:
    return passthrough_merge(inp.tensors[0], inp.model_params[0]["scale"])


PASSTHROUGH = MergeMethod(
    name="passthrough",
    coefficients=lambda mp, _g: (0.0, [float(mp[0]["scale"])]),
    merge=_merge,
    params=(Param("scale", 1.0, True, help="multiplier of the tensor (mergekit: unset = 1)"),),
    min_models=1,
    max_models=1,
    doc="x (optionally scaled)",
)

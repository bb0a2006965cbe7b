"""NearSwap (mergekit `nearswap`): take the other model's value where it is near the base's.

    w_j = clamp(t / max(|base_j - x_j|, 1e-6), 0, 1)
    merged_j = w_j x_j + (1 - w_j) base_j

Entries that differ by at most t become the other model's; farther ones move toward it by
t / |difference|. t = 0 gives the base; a t at least the largest difference gives the other model.
"""

from __future__ import annotations

from torch import Tensor

from evomerge.methods.base import MergeInput, MergeMethod, Param


def nearswap_merge(base: Tensor, x: Tensor, t: float) -> Tensor:
    """w x + (1 - w) base, w = clamp(t / max(|base - x|, 1e-6), 0, 1) elementwise."""
    w = (t / (base - x).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return w * x + (1 - w) * base


def _merge(inp: MergeInput) -> Tensor:
    assert inp.base is not None
    return nearswap_merge(inp.base, inp.tensors[0], inp.global_params["t"])


NEARSWAP = MergeMethod(
    name="nearswap",
    merge=_merge,
    params=(Param("t", None, False, help="distance under which the other model's value is taken"),),
    needs_base=True,
    min_models=1,
    max_models=1,
    skips_base_model=True,
    elementwise=True,
    doc="the other model's entries where they lie within t of the base's, a blend farther out",
)

"""RAM and RAM+ (mergekit `ram`, `ramplus_tl`; arXiv 2601.13572): reinforced agent merging.

An entry of task vector delta_i = x_i - base contributes when |delta_ij| > epsilon (n_ij = 1);
c_j = sum_i n_ij models contribute to entry j. RAM averages the contributions, so an entry that
one model alone changed keeps its full value instead of being diluted by the others' zeros:

    ram:         merged_j = base_j + sum_i n_ij delta_ij / max(c_j, 1)

RAM+ (tensor-local) also scales a model's unique entries by how much it overlaps the others:

    rho_i = #{j: n_ij, c_j > 1} / max(#{j: n_ij, c_j = 1}, epsilon)
    lambda_i = 1 + r * clamp(rho_i, 0, alpha)
    ramplus_tl:  merged_j = base_j + sum_i n_ij delta_ij ([c_j = 1] lambda_i + [c_j > 1] / c_j)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.methods.base import MergeInput, MergeMethod, Param


def _contributions(deltas: Sequence[Tensor], epsilon: float) -> tuple[list[Tensor], Tensor]:
    """n_i = |delta_i| > epsilon per model, and c = sum_i n_i."""
    masks = [d.abs() > epsilon for d in deltas]
    counts = torch.zeros(deltas[0].shape, dtype=torch.int64, device=deltas[0].device)
    for m in masks:
        counts += m
    return masks, counts


def ram_merge(base: Tensor, deltas: Sequence[Tensor], *, epsilon: float = 1e-5) -> Tensor:
    """base + sum_i n_i delta_i / max(c, 1)."""
    masks, counts = _contributions(deltas, epsilon)
    div = counts.clamp(min=1)
    merged = torch.zeros_like(base)
    for d, m in zip(deltas, masks, strict=True):
        merged += d * m / div
    return base + merged


def ramplus_tl_merge(
    base: Tensor,
    deltas: Sequence[Tensor],
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> Tensor:
    """base + sum_i n_i delta_i ([c = 1] lambda_i + [c > 1] / c)."""
    masks, counts = _contributions(deltas, epsilon)
    unique, div = counts == 1, counts.clamp(min=1)
    merged = torch.zeros_like(base)
    for d, m in zip(deltas, masks, strict=True):
        shared_i = torch.count_nonzero(m & (counts > 1))
        unique_i = torch.count_nonzero(m & unique)
        rho = shared_i / unique_i.clamp(min=epsilon)  # float32, as mergekit's
        lam = (1 + r * rho.clamp(min=0, max=alpha)).to(d.dtype)
        merged += torch.where(unique, d * lam, d / div) * m
    return base + merged


def _ram(inp: MergeInput) -> Tensor:
    assert inp.base is not None
    return ram_merge(inp.base, inp.deltas, epsilon=inp.global_params["epsilon"])


def _ramplus(inp: MergeInput) -> Tensor:
    assert inp.base is not None
    g = inp.global_params
    return ramplus_tl_merge(inp.base, inp.deltas, r=g["r"], alpha=g["alpha"], epsilon=g["epsilon"])


def _epsilon(low_open: bool) -> Param:
    return Param("epsilon", 1e-5, False, low=0.0, high=math.inf, low_open=low_open,
                 help="|delta| above this counts as a contribution")  # fmt: skip


RAM = MergeMethod(
    name="ram",
    merge=_ram,
    params=(_epsilon(False),),
    needs_base=True,
    min_models=1,
    skips_base_model=True,
    doc="mean of the task vectors' entries over the models that changed them (|delta| > epsilon)",
)
RAMPLUS_TL = MergeMethod(
    name="ramplus_tl",
    merge=_ramplus,
    params=(
        Param("r", 0.1, False, help="gain on a model's unique entries per unit of overlap"),
        Param("alpha", 0.2, False, help="cap on the overlap ratio rho"),
        _epsilon(True),  # the floor of rho's divisor too: 0 would divide by zero
    ),
    needs_base=True,
    min_models=1,
    skips_base_model=True,
    doc="RAM with each model's unique entries scaled by 1 + r * min(overlap ratio, alpha)",
)

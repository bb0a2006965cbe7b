"""DARE: drop each task-vector entry at random, rescale, then combine (dare_linear, dare_ties).

    kept_i = delta_i * [u < density_i],  u ~ U[0, 1) drawn per entry (float32, seeded)
    s_i(delta_i) = kept_i * |delta_i|_1 / |kept_i|_1   (if rescale; mergekit matches the L1 norm)
    merged = base + lambda * sum_i m_i w_i s_i(delta_i) / D

with m_i the TIES sign-consensus mask for dare_ties (all ones for dare_linear).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor

from evomerge.methods.task_vectors import combine_deltas, rescale_l1, task_vector_method


def dare_prune(
    delta: Tensor, density: float, *, rescale: bool = True, generator: torch.Generator
) -> Tensor:
    """DARE: keep each entry with probability `density`, then match the L1 norm of delta."""
    if density >= 1:
        return delta
    u = torch.rand(delta.shape, generator=generator, dtype=torch.float32, device=delta.device)
    kept = torch.where(u < density, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
    if rescale:
        kept = rescale_l1(kept, delta.abs().sum(), kept.abs().sum())
    return kept


def dare_merge(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    consensus: bool,
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: bool = True,
    generator: torch.Generator,
) -> Tensor:
    """DARE (dare_linear; dare_ties with consensus): random drop + L1 rescale, then combine."""
    pruned = [
        dare_prune(d, p, rescale=rescale, generator=generator)
        for d, p in zip(deltas, densities, strict=True)
    ]
    return combine_deltas(
        pruned, weights, consensus=consensus, normalize=normalize, lambda_=lambda_
    )


DARE_TIES = task_vector_method(
    "dare_ties",
    partial(dare_merge, consensus=True),
    ("density",),
    normalize=False,
    rescale=True,
    random=True,
    doc="random drop with L1 rescale, then TIES sign election",
)
DARE_LINEAR = task_vector_method(
    "dare_linear",
    partial(dare_merge, consensus=False),
    ("density",),
    normalize=False,
    rescale=True,
    random=True,
    doc="random drop with L1 rescale, then task arithmetic",
)

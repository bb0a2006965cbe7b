"""Model breadcrumbs: drop each task vector's outliers and its small values, then combine.

    kept_i = delta_i where its descending |delta_i| rank is in [r, r + n_keep), else 0
    n_keep = int(density_i * n),  r = n - n_bot - n_keep,  n_bot = max(0, n - n_keep - int(gamma_i * n))
    merged = base + lambda * sum_i m_i w_i kept_i / D

with m_i the TIES sign-consensus mask for breadcrumbs_ties (all ones for breadcrumbs).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor

from evomerge.methods.base import Param
from evomerge.methods.task_vectors import combine_deltas, rescale_l1, task_vector_method

GAMMA = Param("gamma", 0.01, True, low=0.0, high=1.0, help="fraction of largest magnitudes dropped")


def breadcrumbs_prune(
    delta: Tensor, density: float, gamma: float, *, rescale: bool = False
) -> Tensor:
    """Breadcrumbs: drop the top int(gamma * n) magnitudes (outliers), then keep int(density * n).

    In ascending |delta| order mergekit keeps positions [n_bot, n_bot + n_keep) with
    n_bot = max(0, n - n_keep - n_top): here the descending ranks [r, r + n_keep), r = n - n_bot
    - n_keep.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    n_keep = int(density * n)
    n_bot = max(0, n - n_keep - int(gamma * n))
    r = n - n_bot - n_keep
    flat = delta.reshape(-1)
    kept = torch.zeros_like(flat)
    if n_keep > 0:
        idx = torch.topk(flat.abs(), r + n_keep, sorted=True).indices[r:]
        kept.index_copy_(0, idx, flat.index_select(0, idx))
    if rescale:
        kept = rescale_l1(kept, flat.abs().sum(), kept.abs().sum())
    return kept.view_as(delta)


def breadcrumbs_merge(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    *,
    consensus: bool,
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: bool = False,
) -> Tensor:
    """Model breadcrumbs (breadcrumbs_ties with consensus): outlier+small-value trim, combine."""
    pruned = [
        breadcrumbs_prune(d, p, g, rescale=rescale)
        for d, p, g in zip(deltas, densities, gammas, strict=True)
    ]
    return combine_deltas(
        pruned, weights, consensus=consensus, normalize=normalize, lambda_=lambda_
    )


BREADCRUMBS = task_vector_method(
    "breadcrumbs",
    partial(breadcrumbs_merge, consensus=False),
    ("density", "gamma"),
    normalize=False,
    rescale=False,
    extra=(GAMMA,),
    doc="drop outliers and small values, then task arithmetic",
)
BREADCRUMBS_TIES = task_vector_method(
    "breadcrumbs_ties",
    partial(breadcrumbs_merge, consensus=True),
    ("density", "gamma"),
    normalize=False,
    rescale=False,
    extra=(GAMMA,),
    doc="drop outliers and small values, then TIES sign election",
)

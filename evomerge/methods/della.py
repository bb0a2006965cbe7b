"""DELLA: drop task-vector entries at random, small magnitudes more often, rescale, combine.

    p_j = density - epsilon + 2 epsilon * rank_j / (n - 1)   (rank_j: ascending |delta| rank)
    kept_i = delta_i * [u < p],  u ~ U[0, 1) drawn per entry (float32, seeded)
    merged = base + lambda * sum_i m_i w_i rescale(kept_i) / D

with m_i the TIES sign-consensus mask for della (all ones for della_linear). Every p_j must lie
in (0, 1): density - epsilon > 0 and density + epsilon < 1, checked at planning.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from evomerge.errors import ConfigError
from evomerge.methods.base import Param
from evomerge.methods.task_vectors import combine_deltas, rescale_l1, task_vector_method

EPSILON = Param(
    "epsilon", 0.15, True, low=0.0, high=1.0, help="spread of keep probabilities by rank"
)


def della_prune(
    delta: Tensor,
    density: float,
    epsilon: float,
    *,
    rescale: bool = True,
    generator: torch.Generator,
) -> Tensor:
    """DELLA MagPrune: keep entry j with p_j = density - epsilon + 2 epsilon * rank_j / (n - 1).

    rank_j is the ascending |delta| rank along dim 1 (a 1-D tensor is one row), as mergekit; a
    dimension of size 1 (where mergekit divides 0 by 0) gets p = density.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    check_della(density, epsilon, "della_prune")
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    n = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1)
    pos = torch.arange(n, device=delta.device, dtype=torch.float32)
    pos = pos.view((1, n) + (1,) * (rows.dim() - 2)).expand(order.shape)
    rank = torch.empty(order.shape, dtype=torch.float32, device=delta.device)
    rank.scatter_(1, order, pos)
    rank_norm = rank / (n - 1) if n > 1 else torch.full_like(rank, 0.5)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    u = torch.rand(rows.shape, generator=generator, dtype=torch.float32, device=delta.device)
    kept = torch.where(u < probs, rows, torch.zeros((), dtype=delta.dtype, device=delta.device))
    if rescale:
        kept = rescale_l1(kept, rows.abs().sum(), kept.abs().sum())
    return kept.view_as(delta)


def della_merge(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    epsilons: Sequence[float],
    *,
    consensus: bool,
    normalize: bool = True,
    lambda_: float = 1.0,
    rescale: bool = True,
    generator: torch.Generator,
) -> Tensor:
    """DELLA (della_linear without consensus): magnitude-ranked random drop, rescale, combine."""
    pruned = [
        della_prune(d, p, e, rescale=rescale, generator=generator)
        for d, p, e in zip(deltas, densities, epsilons, strict=True)
    ]
    return combine_deltas(
        pruned, weights, consensus=consensus, normalize=normalize, lambda_=lambda_
    )


def check_della(density: float, epsilon: float, where: str) -> None:
    """Keep probabilities density +/- epsilon must stay inside (0, 1)."""
    if density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise ConfigError(
            f"{where}: della needs density - epsilon > 0 and density + epsilon < 1 "
            f"(density={density}, epsilon={epsilon}); lower 'epsilon' or move 'density'"
        )


def _check_della_params(
    model_params: Sequence[dict[str, Any]], _g: dict[str, Any], where: str
) -> None:
    for i, p in enumerate(model_params):
        check_della(p["density"], p["epsilon"], f"{where}, model {i}")


DELLA = task_vector_method(
    "della",
    partial(della_merge, consensus=True),
    ("density", "epsilon"),
    normalize=True,
    rescale=True,
    extra=(EPSILON,),
    random=True,
    check=_check_della_params,
    doc="magnitude-ranked random drop with L1 rescale, then TIES sign election",
)
DELLA_LINEAR = task_vector_method(
    "della_linear",
    partial(della_merge, consensus=False),
    ("density", "epsilon"),
    normalize=False,
    rescale=True,
    extra=(EPSILON,),
    random=True,
    check=_check_della_params,
    doc="magnitude-ranked random drop with L1 rescale, then task arithmetic",
)

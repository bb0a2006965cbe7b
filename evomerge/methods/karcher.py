"""Karcher mean (mergekit `karcher`): the Riemannian centre of the models' directions on the
unit sphere, scaled by their mean norm.

    u_i = x_i / |x_i|,   m_0 = normalize(sum_i a_i u_i),   a_i = 1 / #valid
    repeat up to max_iter times:
        v = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m),  cos(theta_i) = <m, u_i>
        stop when |v| < tol;  m <- normalize(cos|v| m + sin|v| v / |v|)
    merged = (sum_i |x_i| / N) m

v is the Riemannian gradient step toward the minimum of sum_i a_i theta_i^2 (the Karcher mean);
terms with theta_i < tol are skipped. Models with |x_i| <= tol are left out of the direction (a
"valid" model has a larger norm) but not of the mean norm; none valid gives zeros, and where
|sum_i a_i u_i| < tol the start is u of the first valid model. One model gives itself back.
No base is used: mergekit feeds base_model in as one more model, which the recipe reader does
by listing it among the models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.methods.base import MergeInput, MergeMethod, Param


def karcher_mean(tensors: Sequence[Tensor], *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """The uniform Karcher mean of the directions times the mean norm; see the module."""
    if len(tensors) == 1:
        return tensors[0]
    norms = [torch.linalg.vector_norm(x) for x in tensors]
    valid = [(x, n) for x, n in zip(tensors, norms, strict=True) if float(n) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    alpha = 1.0 / len(valid)
    units = [(x / n).reshape(-1) for x, n in valid]
    mean = torch.zeros_like(units[0])
    for u in units:
        mean.add_(u, alpha=alpha)
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for u in units:
            cos = torch.dot(mean, u).clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            # theta < tol: the term is skipped (where() keeps the 0/0 of theta = 0 out)
            coef = torch.where(theta < tol, 0.0, alpha * theta / torch.sin(theta))
            tangent += coef * (u - cos * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if float(tangent_norm) < tol:  # one host sync per iteration
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    scale = sum(norms) / len(tensors)
    return (scale * mean).reshape(tensors[0].shape)


def _merge(inp: MergeInput) -> Tensor:
    g = inp.global_params
    return karcher_mean(inp.tensors, max_iter=g["max_iter"], tol=g["tol"])


KARCHER = MergeMethod(
    name="karcher",
    merge=_merge,
    params=(
        Param("max_iter", 10, False, int, low=0, high=math.inf, help="most gradient steps"),
        Param("tol", 1e-5, False, low=0.0, high=math.inf, help="stop when the step is this small"),
    ),
    min_models=1,
    doc="Karcher (Riemannian) mean of the directions on the unit sphere, times the mean norm",
)

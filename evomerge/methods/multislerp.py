"""Multi-SLERP (mergekit `multislerp`): barycentric interpolation of any number of models on
the hypersphere, around base_model when one is set.

    v_i = x_i - base (x_i without a base),  u_i = v_i / (|v_i| + eps),  w_i /= sum_j w_j (normalizing)
    m = sum_i w_i u_i
    merged = base + (sum_i w_i |v_i|) * m / |m|

mergekit projects the u_i onto the tangent space at m / |m|, averages them there and maps the
average back with the exponential map. That average is zero (the tangent components of
sum_i w_i u_i = m vanish at m's own direction), so the map returns m / |m| itself: the line above
is the same result without the round trip (they differ by float rounding, about 1e-7 in fp32).
One model gives itself back; where |m| < eps (antipodal inputs whose weights cancel) two models
fall back to sum_i w_i v_i and more are an error, as in mergekit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from evomerge.errors import ConfigError
from evomerge.methods.base import MergeInput, MergeMethod, Param


def multislerp_merge(
    vectors: Sequence[Tensor],
    weights: Sequence[float],
    *,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    name: str = "",
) -> Tensor:
    """(sum_i w_i |v_i|) * m / |m|, m = sum_i w_i v_i / (|v_i| + eps), for two or more v_i."""
    if normalize_weights:
        total = float(sum(weights))
        weights = [w / total for w in weights]
    norms = [torch.linalg.vector_norm(v) for v in vectors]  # 0-d, on device
    mean = torch.zeros_like(vectors[0])
    for v, n, w in zip(vectors, norms, weights, strict=True):
        mean.add_(v / (n + eps), alpha=w)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:  # one host sync per tensor
        if len(vectors) != 2:
            raise ConfigError(
                f"tensor {name!r}: multislerp's weighted sum of the unit tensors is zero "
                "(antipodal models whose weights cancel); change the weights"
            )
        return vectors[0] * weights[0] + vectors[1] * weights[1]
    avg_norm = sum(w * n for w, n in zip(weights, norms, strict=True))
    return mean * (avg_norm / mean_norm)


def _merge(inp: MergeInput) -> Tensor:
    if len(inp.model_params) == 1:
        return inp.tensors[0]  # nothing to interpolate (mergekit returns the input too)
    g = inp.global_params
    kw = {"normalize_weights": g["normalize_weights"], "eps": g["eps"], "name": inp.name}
    weights = inp.per_model("weight")
    if inp.base is None:
        return multislerp_merge(inp.tensors, weights, **kw)
    return inp.base + multislerp_merge(inp.deltas, weights, **kw)


def _check(model_params: Sequence[dict[str, Any]], g: dict[str, Any], where: str) -> None:
    total = sum(float(p["weight"]) for p in model_params)
    if g["normalize_weights"] and len(model_params) > 1 and abs(total) < 1e-12:
        raise ConfigError(
            f"{where}: multislerp's weights sum to zero, so they cannot be normalized; "
            "change a weight or set normalize_weights: false"
        )


MULTISLERP = MergeMethod(
    name="multislerp",
    merge=_merge,
    params=(
        Param("weight", None, True, help="barycentric weight of this model (required)"),
        Param("normalize_weights", True, False, bool, help="divide the weights by their sum"),
        Param(
            "eps", 1e-8, False, low=0.0, high=math.inf, help="added to the norms before dividing"
        ),
    ),
    min_models=1,
    skips_base_model=True,  # base_model, when set, is the centre of the sphere, not an input
    check=_check,
    doc="spherical barycentre of any number of models (of their task vectors with base_model)",
)

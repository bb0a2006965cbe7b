"""Linear (model soup): a weighted average of the full tensors (mergekit `linear`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from evomerge.methods.base import Coefficients, MergeInput, MergeMethod, Param


def linear_merge(
    tensors: Sequence[Tensor], weights: Sequence[float], *, normalize: bool = True
) -> Tensor:
    """sum_i w_i x_i, divided by sum_i w_i when `normalize`.

    mergekit divides even by a zero sum (giving inf/NaN); here a sum with |sum| < 1e-8 is left
    undivided, as mergekit's task arithmetic does.
    """
    out = tensors[0] * weights[0]
    for x, w in zip(tensors[1:], weights[1:], strict=True):
        out.add_(x, alpha=w)
    total = float(sum(weights))
    if normalize and abs(total) >= 1e-8:
        out /= total
    return out


def linear_coefficients(
    model_params: Sequence[dict[str, Any]], global_params: dict[str, Any]
) -> Coefficients:
    """linear_merge as a weighted sum: c_i = w_i / sum_j w_j (w_i without normalize)."""
    weights = [float(p["weight"]) for p in model_params]
    total = sum(weights)
    div = total if global_params["normalize"] and abs(total) >= 1e-8 else 1.0
    return 0.0, [w / div for w in weights]


def _merge(inp: MergeInput) -> Tensor:
    return linear_merge(
        inp.tensors, inp.per_model("weight"), normalize=inp.global_params["normalize"]
    )


LINEAR = MergeMethod(
    name="linear",
    coefficients=linear_coefficients,
    merge=_merge,
    params=(
        Param("weight", None, True, help="coefficient of this model (required)"),
        Param("normalize", True, False, bool, help="divide by the sum of the weights"),
    ),
    min_models=1,
    doc="sum_i w_i x_i / sum_i w_i",
)

"""Linear (model soup): a weighted average of the full tensors (mergekit `linear`)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from evomerge.methods.base import MergeInput, MergeMethod, Param, register_method


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


def _merge(inp: MergeInput) -> Tensor:
    return linear_merge(
        inp.tensors, inp.per_model("weight"), normalize=inp.global_params["normalize"]
    )


register_method(
    MergeMethod(
        name="linear",
        elementwise=True,
        merge=_merge,
        params=(
            Param("weight", None, True, help="coefficient of this model (required)"),
            Param("normalize", True, False, bool, help="divide by the sum of the weights"),
        ),
        min_models=1,
        doc="sum_i w_i x_i / sum_i w_i",
    )
)

"""Task arithmetic: the task-vector equation with no sparsifier and no consensus.

    merged = base + lambda * sum_i w_i delta_i / D,   D = sum_i w_i if normalize else 1

A fixed weighted sum of base and sources, so the engine runs it through the fused weighted-sum
kernel (`task_arithmetic_coefficients`); `task_arithmetic_merge` is the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from evomerge.methods.base import Coefficients
from evomerge.methods.linear import linear_coefficients
from evomerge.methods.task_vectors import combine_deltas, task_vector_method


def task_arithmetic_merge(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """Task arithmetic: lambda * sum_i w_i delta_i (/ sum_i w_i if normalize). Returns the delta."""
    return combine_deltas(deltas, weights, consensus=False, normalize=normalize, lambda_=lambda_)


def task_arithmetic_coefficients(
    model_params: Sequence[dict[str, Any]], global_params: dict[str, Any]
) -> Coefficients:
    """Task arithmetic as a weighted sum of base and sources: c_i = lambda w_i / D and
    c_base = 1 - sum_i c_i, with D = sum_i w_i when normalizing (|D| < 1e-8: 1), else 1."""
    _, normalized = linear_coefficients(model_params, global_params)
    cs = [global_params["lambda"] * c for c in normalized]
    return 1.0 - sum(cs), cs


TASK_ARITHMETIC = task_vector_method(
    "task_arithmetic",
    task_arithmetic_merge,
    (),
    normalize=False,
    rescale=False,
    coefficients=task_arithmetic_coefficients,
    takes_rescale=False,
    doc="base + lambda * sum_i w_i delta_i",
)

"""Model Stock (mergekit `model_stock`, arXiv 2403.19522): interpolate the fine-tunes' mean
toward the base by a ratio set by the angle between their task vectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.methods.base import MergeInput, MergeMethod, Param


def model_stock_merge(
    base: Tensor, deltas: Sequence[Tensor], *, filter_wise: bool = False
) -> Tensor:
    """base + t * mean_i delta_i, t = N cos / (1 + (N - 1) cos).

    cos is the mean over pairs i < j of <delta_i, delta_j> / max(|delta_i||delta_j|, 1e-6),
    each clamped to [-1, 1]: over the whole tensor, or per row of the last dimension with
    `filter_wise` (a 1-D tensor is one row). Where |1 + (N - 1) cos| < 1e-6, t = 0 (base kept).
    Equals mergekit's t * mean(x_i) + (1 - t) * base.
    """
    n = len(deltas)
    if filter_wise:
        rows = [d if d.dim() >= 2 else d.unsqueeze(0) for d in deltas]
    else:
        rows = [d.reshape(-1) for d in deltas]
    norms = [torch.linalg.vector_norm(r, dim=-1) for r in rows]
    cos_sum = torch.zeros_like(norms[0])
    for i in range(n):
        for j in range(i + 1, n):
            dot = (rows[i] * rows[j]).sum(dim=-1)
            cos_sum += (dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
    cos = (cos_sum / (n * (n - 1) // 2)).unsqueeze(-1)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0, n * cos / torch.where(singular, 1, denominator))
    mean = torch.stack(rows).mean(dim=0)
    return base + (t * mean).reshape(base.shape)


def _merge(inp: MergeInput) -> Tensor:
    assert inp.base is not None
    return model_stock_merge(inp.base, inp.deltas, filter_wise=inp.global_params["filter_wise"])


MODEL_STOCK = MergeMethod(
    name="model_stock",
    merge=_merge,
    params=(
        Param("filter_wise", False, False, bool, help="one ratio per row instead of per tensor"),
    ),
    needs_base=True,
    min_models=2,
    skips_base_model=True,
    doc="base + t * mean task vector, t from the mean pairwise cosine",
)

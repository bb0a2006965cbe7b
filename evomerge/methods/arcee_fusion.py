"""Arcee Fusion (mergekit `arcee_fusion`): take the other model's entries that matter most.

    p = softmax(x) + 1e-8,  q = softmax(base) + 1e-8          (over the last dimension)
    importance_j = |x_j - base_j| * sum_k p_k log(p_k / q_k)   (the KL term of j's row)
    threshold = Q_1/2 + 1.5 (Q_3/4 - Q_1/4),  Q_q = sorted(importance)[floor(q (n - 1))]
    merged_j = base_j + (x_j - base_j) [importance_j >= threshold]

An entry is taken when its importance is an upper outlier (Tukey's fence from the median).
mergekit estimates the quartiles of a tensor over 1M entries from 1M entries drawn with
replacement by an unseeded generator, so its output for such tensors is not deterministic; here
the quartiles are exact (the quantity it estimates), and equal to mergekit's up to 1M entries.
"""

from __future__ import annotations

import torch
from torch import Tensor

from evomerge.methods.base import MergeInput, MergeMethod

KL_EPS = 1e-8  # added to both softmaxes (mergekit's value)


def fusion_importance(x: Tensor, base: Tensor, delta: Tensor) -> Tensor:
    """|delta| times the KL divergence of the row softmaxes of x from base's."""
    p = torch.softmax(x, dim=-1) + KL_EPS
    q = torch.softmax(base, dim=-1) + KL_EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return delta.abs() * kl


def fence(importance: Tensor) -> Tensor:
    """median + 1.5 IQR, the order statistics at floor(q (n - 1)) for q = 1/4, 1/2, 3/4."""
    flat = importance.reshape(-1)
    last = flat.numel() - 1

    def order_stat(i: int) -> Tensor:  # the (i + 1)-th smallest
        return torch.kthvalue(flat, i + 1).values

    q1, median, q3 = order_stat(last // 4), order_stat(last // 2), order_stat(3 * last // 4)
    return median + 1.5 * (q3 - q1)


def arcee_fusion_merge(base: Tensor, x: Tensor, delta: Tensor) -> Tensor:
    """base + delta where the importance reaches the fence; see the module."""
    importance = fusion_importance(x, base, delta)
    keep = importance >= fence(importance)
    return base + torch.where(keep, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))


def _merge(inp: MergeInput) -> Tensor:
    assert inp.base is not None
    return arcee_fusion_merge(inp.base, inp.tensors[0], inp.deltas[0])


ARCEE_FUSION = MergeMethod(
    name="arcee_fusion",
    merge=_merge,
    needs_base=True,
    min_models=1,
    max_models=1,
    skips_base_model=True,
    doc="the other model's entries whose |delta| x row KL is an upper outlier (median + 1.5 IQR)",
)

"""SCE (mergekit `sce`, arXiv 2408.07990): select, calculate, erase, over the task vectors
delta_i = x_i - base of n models; no per-model weights.

    select:    keep the k = int(select_topk * #{j: var_j > 0}) entries of largest variance across
               the models, var_j = mean_i (delta_ij - mean_i' delta_i'j)^2 (all entries when
               select_topk >= 1, none when <= 0); the others are zeroed in every delta
    calculate: w_i = mean_j delta_ij^2 / sum_i' mean_j delta_i'j^2 (w_i = 1/n if that sum < 1e-6)
    erase:     m_ij = [sign(delta_ij) == sign(sum_i' delta_i'j)] (a zero sum counts as +)
    merged = base + sum_i w_i m_ij delta_ij / max(sum_i w_i m_ij, 1e-6)

The sign election is over the unweighted deltas (TIES elects over w_i delta_i) and the
divisor's floor is 1e-6 (TIES: a zero divisor becomes 1), as in mergekit. The top-k keeps
exactly k entries, ties at the threshold going to the lowest indices (topk.py; mergekit's
torch.topk breaks them arbitrarily).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from evomerge.methods.base import MergeInput, MergeMethod, Param
from evomerge.methods.topk import top_k_rule


def sce_select(deltas: Tensor, select_topk: float) -> Tensor:
    """The boolean mask of the kept entries (shape of one delta) over stacked deltas (n, ...)."""
    if select_topk >= 1:
        return torch.ones(deltas.shape[1:], dtype=torch.bool, device=deltas.device)
    if select_topk <= 0:
        return torch.zeros(deltas.shape[1:], dtype=torch.bool, device=deltas.device)
    var = torch.var(deltas, dim=0, unbiased=False).reshape(-1)
    k = int(torch.count_nonzero(var) * select_topk)  # a float32 product, as mergekit's
    return top_k_rule(var, k).mask(var).view(deltas.shape[1:])


def sce_merge(base: Tensor, deltas: Sequence[Tensor], *, select_topk: float = 1.0) -> Tensor:
    """base + the SCE combination of the deltas; see the module."""
    tv = torch.stack(list(deltas))  # (n, ...)
    if select_topk < 1:
        tv = tv * sce_select(tv, select_topk)
    elected = torch.where(tv.sum(dim=0) >= 0, 1.0, -1.0).to(tv.dtype)
    agree = tv.sign() == elected  # (n, ...); a zero entry never agrees
    energy = tv.square().reshape(tv.shape[0], -1).mean(dim=1)  # (n,)
    total = float(energy.sum())
    w = torch.full_like(energy, 1 / len(energy)) if abs(total) < 1e-6 else energy / total
    w_agree = w.view(-1, *([1] * (tv.dim() - 1))) * agree
    return base + (tv * w_agree).sum(dim=0) / w_agree.sum(dim=0).clamp(min=1e-6)


def _merge(inp: MergeInput) -> Tensor:
    assert inp.base is not None
    return sce_merge(inp.base, inp.deltas, select_topk=inp.global_params["select_topk"])


SCE = MergeMethod(
    name="sce",
    merge=_merge,
    params=(
        Param(
            "select_topk",
            1.0,
            False,
            low=0.0,
            high=1.0,
            help="fraction of the entries kept, those of largest variance across the models",
        ),
        Param("int8_mask", False, False, bool, help="accepted for mergekit; no effect here"),
    ),
    needs_base=True,
    min_models=1,
    skips_base_model=True,
    doc="variance top-k select, energy weights, sign-consensus erase (no per-model weights)",
)

"""TIES sign election and disjoint merge, with the magnitude trim folded in, in cache-sized chunks.

    merged = lambda * sum_i m_i s_i w_i kept_i / D

kept_i is delta_i trimmed by its top-k rule (all of delta_i without one), s_i a rescale factor,
the elected sign is sign(sum_i s_i w_i kept_i) (zero counts as +), m_i = [sign(s_i w_i kept_i) ==
elected] (a zero entry never agrees) and D = sum_i m_i w_i when normalizing (a zero D becomes 1).

Why this shape: on CPU the obvious version (stack, boolean masks, `where`) spends its time in
bool kernels that are ~10x slower than float ones and in passes over DRAM. Here each model
contributes its positive and negative parts, P = sum max(wd_i, 0) and N = sum min(wd_i, 0):
agreeing with a + election means wd_i > 0, so the merge is P where P + N >= 0 and N elsewhere, and
D is the sum of w_i over models with a positive (or negative) part there. Every step is a float
op (`threshold`, `sign`, `add`, exact 0/1 `lerp`) on a chunk that stays in L2 cache. Measured on
a 4.2M-element tensor with 2 models, 2 cores: 14 ms against 62 ms.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from evomerge.methods.topk import TopK

CPU_CHUNK = 1 << 17  # fastest of 2^16..2^20 on a 2-core CPU (13.5 ms vs 16.7 / 24.9 ms)


def sign_consensus(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    normalize: bool,
    lambda_: float = 1.0,
    keep: Sequence[TopK | None] | None = None,
    scales: Sequence[float] | None = None,
    chunk: int | None = None,
) -> Tensor:
    """The merged task vector (shape and dtype of the deltas), see the module docstring.

    `keep[i]` is the top-k rule over |delta_i| (None: keep all), `scales[i]` s_i (default 1),
    `chunk` the elements per step (default: CPU_CHUNK on CPU, the whole tensor elsewhere).
    """
    shape, dtype, device = deltas[0].shape, deltas[0].dtype, deltas[0].device
    flats = [d.reshape(-1) for d in deltas]
    n = flats[0].numel()
    rules = list(keep) if keep is not None else [None] * len(flats)
    s = list(scales) if scales is not None else [1.0] * len(flats)
    all_positive = all(w > 0 for w in weights)
    out = torch.empty(n, dtype=dtype, device=device)
    step = chunk or (CPU_CHUNK if device.type == "cpu" else max(n, 1))
    for a, b in _pieces(n, step, rules):
        pos_sum = torch.zeros(b - a, dtype=dtype, device=device)
        neg_sum = torch.zeros_like(pos_sum)
        w_pos = torch.zeros_like(pos_sum) if normalize else None
        w_neg = torch.zeros_like(pos_sum) if normalize else None
        for flat, w, si, rule in zip(flats, weights, s, rules, strict=True):
            d = flat[a:b]
            # kept zeros never agree, so a threshold below 0 (keep all) acts as 0
            t = max(rule.cut_before(a, dtype), 0.0) if rule is not None else 0.0
            up = F.threshold(d, t, 0.0)  # d where d > t: the kept positive part
            down = F.threshold(d.neg(), t, 0.0)  # |d| where d < -t: the kept negative part
            ws = w * si
            if ws < 0:
                up, down = down, up  # a negative weight flips which part is positive
            pos_sum.add_(up, alpha=abs(ws))
            neg_sum.add_(down, alpha=-abs(ws))
            if w_pos is not None and w_neg is not None:
                w_pos.add_(up.sign_(), alpha=w)
                w_neg.add_(down.sign_(), alpha=w)
        elected_up = (pos_sum + neg_sum).sign_().add_(1).clamp_(max=1)  # 1 where sum >= 0, else 0
        merged = torch.lerp(neg_sum, pos_sum, elected_up)  # exactly one or the other
        if w_pos is not None and w_neg is not None:
            divisor = torch.lerp(w_neg, w_pos, elected_up)
            if all_positive:  # D is 0 or at least min(w); where it is 0 the merge is 0 too
                divisor.clamp_(min=min(weights))
            else:
                divisor.masked_fill_(divisor == 0, 1)
            merged.div_(divisor)
        if lambda_ != 1:
            merged.mul_(lambda_)
        out[a:b] = merged
    return out.view(shape)


def _pieces(n: int, step: int, rules: Sequence[TopK | None]) -> list[tuple[int, int]]:
    """Chunk bounds of at most `step`, also cut after each rule's last tie, so that every rule
    has a single threshold inside every piece."""
    cuts = set(range(0, n, step)) | {n}
    cuts |= {r.last_tie + 1 for r in rules if r is not None and 0 <= r.last_tie < n - 1}
    bounds = sorted(cuts)
    return list(itertools.pairwise(bounds))

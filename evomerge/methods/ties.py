"""TIES: trim each task vector to its largest magnitudes, elect a sign, take the disjoint mean.

    merged = base + lambda * sum_i m_i s_i w_i topk_i(delta_i) / D

topk_i keeps the k = max(1, int(density_i * n)) largest |delta_i| (none if density <= 0), m_i
is the sign-consensus mask and D = sum_i m_i w_i when normalizing (consensus.py); s_i rescales
the kept part to the L1 norm of delta_i when `rescale`, else 1.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from evomerge.methods.consensus import sign_consensus
from evomerge.methods.task_vectors import RESCALE_EPS, task_vector_method
from evomerge.methods.topk import TopK, top_k_rule


def magnitude_rule(magnitudes: Tensor, density: float) -> TopK:
    """TIES' trim over flat |delta|: keep exactly k = max(1, int(density * n)) largest (none if
    density <= 0). The same set as mergekit's `argsort(|delta|, descending)[:k]`; ties at the
    threshold go to the lowest indices (mergekit breaks them arbitrarily, also keeping k)."""
    k = 0 if density <= 0 else max(1, int(density * magnitudes.numel()))
    return top_k_rule(magnitudes, k)


def ties_merge(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    normalize: bool = True,
    lambda_: float = 1.0,
    rescale: bool = False,
    chunk: int | None = None,
) -> Tensor:
    """TIES: magnitude top-k trim of each delta, sign election, disjoint (weighted) mean.

    The trim is a threshold rule per model applied inside the consensus kernel, so no trimmed
    copy of any delta is made; `chunk` is the kernel's step (tests use tiny ones).
    """
    rules: list[TopK | None] = []
    scales: list[float] = []
    for d, p in zip(deltas, densities, strict=True):
        if p >= 1:
            rules.append(None)
            scales.append(1.0)
            continue
        magnitudes = d.reshape(-1).abs()
        rules.append(magnitude_rule(magnitudes, p))
        scales.append(_kept_l1_scale(magnitudes, rules[-1]) if rescale else 1.0)
    return sign_consensus(
        deltas,
        weights,
        normalize=normalize,
        lambda_=lambda_,
        keep=rules,
        scales=scales,
        chunk=chunk,
    )


def _kept_l1_scale(magnitudes: Tensor, rule: TopK) -> float:
    """|delta|_1 / |kept|_1, or 1 when either is below the rescale epsilon (as rescale_l1)."""
    before = float(magnitudes.sum())
    after = float(magnitudes[rule.mask(magnitudes)].sum())
    return before / after if before >= RESCALE_EPS and after >= RESCALE_EPS else 1.0


TIES = task_vector_method(
    "ties",
    ties_merge,
    ("density",),
    normalize=True,
    rescale=False,
    doc="magnitude top-k trim, sign election, disjoint mean",
)

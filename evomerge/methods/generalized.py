"""Task-vector methods: mergekit's generalized task arithmetic family.

Every method here is one equation over the task vectors delta_i = x_i - base:

    merged = base + lambda * sum_i m_i * w_i * s_i(delta_i) / D

s_i is the method's sparsifier (identity, TIES magnitude top-k, DARE random drop, breadcrumbs
band, DELLA magnitude-ranked drop), m_i the TIES sign-consensus mask (all ones without
consensus) and D the normalizer (1 unless `normalize`). Parameter names, defaults and numerics
follow mergekit 0.1.5 (`generalized_task_arithmetic.py`, `sparsify.py`).

Random methods draw their masks as `torch.rand(shape, float32, generator) < p`, model by model
in order (no draw for a model with density >= 1), so a (seed, tensor name, device) triple always
gives the same result, in float32 and float64 compute alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from evomerge.errors import ConfigError
from evomerge.methods.base import (
    Coefficients,
    MergeInput,
    MergeMethod,
    Param,
    register_method,
)
from evomerge.methods.consensus import sign_consensus
from evomerge.methods.linear import linear_coefficients, linear_merge
from evomerge.methods.topk import TopK, top_k_rule

_RESCALE_EPS = 1e-7  # mergekit rescaled_masked_tensor: no rescale when either L1 norm is below


# ---------------------------------------------------------------- sparsifiers (one task vector)


def _rescale_l1(kept: Tensor, before: Tensor, after: Tensor) -> Tensor:
    """kept * |delta|_1 / |kept|_1 (DARE's rescale, matched in L1 as mergekit), unless tiny."""
    ok = (before >= _RESCALE_EPS) & (after >= _RESCALE_EPS)
    return kept * torch.where(ok, before / after, torch.ones_like(before))


def magnitude_rule(magnitudes: Tensor, density: float) -> TopK:
    """TIES' trim over flat |delta|: keep exactly k = max(1, int(density * n)) largest (none if
    density <= 0). The same set as mergekit's `argsort(|delta|, descending)[:k]`; ties at the
    threshold go to the lowest indices (mergekit breaks them arbitrarily, also keeping k)."""
    k = 0 if density <= 0 else max(1, int(density * magnitudes.numel()))
    return top_k_rule(magnitudes, k)


def breadcrumbs_prune(
    delta: Tensor, density: float, gamma: float, *, rescale: bool = False
) -> Tensor:
    """Breadcrumbs: drop the top int(gamma * n) magnitudes (outliers), then keep int(density * n).

    In ascending |delta| order mergekit keeps positions [n_bot, n_bot + n_keep) with
    n_bot = max(0, n - n_keep - n_top): here the descending ranks [r, r + n_keep), r = n - n_bot
    - n_keep.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    n_keep = int(density * n)
    n_bot = max(0, n - n_keep - int(gamma * n))
    r = n - n_bot - n_keep
    flat = delta.reshape(-1)
    kept = torch.zeros_like(flat)
    if n_keep > 0:
        idx = torch.topk(flat.abs(), r + n_keep, sorted=True).indices[r:]
        kept.index_copy_(0, idx, flat.index_select(0, idx))
    if rescale:
        kept = _rescale_l1(kept, flat.abs().sum(), kept.abs().sum())
    return kept.view_as(delta)


def dare_prune(
    delta: Tensor, density: float, *, rescale: bool = True, generator: torch.Generator
) -> Tensor:
    """DARE: keep each entry with probability `density`, then match the L1 norm of delta."""
    if density >= 1:
        return delta
    u = torch.rand(delta.shape, generator=generator, dtype=torch.float32, device=delta.device)
    kept = torch.where(u < density, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
    if rescale:
        kept = _rescale_l1(kept, delta.abs().sum(), kept.abs().sum())
    return kept


def della_prune(
    delta: Tensor,
    density: float,
    epsilon: float,
    *,
    rescale: bool = True,
    generator: torch.Generator,
) -> Tensor:
    """DELLA MagPrune: keep entry j with p_j = density - epsilon + 2 epsilon * rank_j / (n - 1).

    rank_j is the ascending |delta| rank along dim 1 (a 1-D tensor is one row), as mergekit; a
    dimension of size 1 (where mergekit divides 0 by 0) gets p = density.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    _check_della(density, epsilon, "della_prune")
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    n = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1)
    pos = torch.arange(n, device=delta.device, dtype=torch.float32)
    pos = pos.view((1, n) + (1,) * (rows.dim() - 2)).expand(order.shape)
    rank = torch.empty(order.shape, dtype=torch.float32, device=delta.device)
    rank.scatter_(1, order, pos)
    rank_norm = rank / (n - 1) if n > 1 else torch.full_like(rank, 0.5)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    u = torch.rand(rows.shape, generator=generator, dtype=torch.float32, device=delta.device)
    kept = torch.where(u < probs, rows, torch.zeros((), dtype=delta.dtype, device=delta.device))
    if rescale:
        kept = _rescale_l1(kept, rows.abs().sum(), kept.abs().sum())
    return kept.view_as(delta)


# ------------------------------------------------------------------ combination (all models)


def combine_deltas(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> Tensor:
    """lambda * sum_i m_i w_i delta_i / D.

    Consensus (TIES "sum"): the elected sign is sign(sum_i w_i delta_i), zero counting as +;
    m_i = [sign(w_i delta_i) == elected] (a zero entry never agrees) and D = sum_i m_i w_i (a zero
    D becomes 1). Without consensus m_i = 1 and D = sum_i w_i (|D| < 1e-8 becomes 1).
    """
    if consensus:
        return sign_consensus(deltas, weights, normalize=normalize, lambda_=lambda_)
    mixed = linear_merge(deltas, weights, normalize=normalize)
    if lambda_ != 1:
        mixed *= lambda_
    return mixed


# ------------------------------------------------------------ the methods, as pure functions


def task_arithmetic_merge(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """Task arithmetic: lambda * sum_i w_i delta_i (/ sum_i w_i if normalize). Returns the delta."""
    return combine_deltas(deltas, weights, consensus=False, normalize=normalize, lambda_=lambda_)


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
    """|delta|_1 / |kept|_1, or 1 when either is below the rescale epsilon (as _rescale_l1)."""
    before = float(magnitudes.sum())
    after = float(magnitudes[rule.mask(magnitudes)].sum())
    return before / after if before >= _RESCALE_EPS and after >= _RESCALE_EPS else 1.0


def dare_merge(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    consensus: bool,
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: bool = True,
    generator: torch.Generator,
) -> Tensor:
    """DARE (dare_linear; dare_ties with consensus): random drop + L1 rescale, then combine."""
    pruned = [
        dare_prune(d, p, rescale=rescale, generator=generator)
        for d, p in zip(deltas, densities, strict=True)
    ]
    return combine_deltas(
        pruned, weights, consensus=consensus, normalize=normalize, lambda_=lambda_
    )


def breadcrumbs_merge(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    *,
    consensus: bool,
    normalize: bool = False,
    lambda_: float = 1.0,
    rescale: bool = False,
) -> Tensor:
    """Model breadcrumbs (breadcrumbs_ties with consensus): outlier+small-value trim, combine."""
    pruned = [
        breadcrumbs_prune(d, p, g, rescale=rescale)
        for d, p, g in zip(deltas, densities, gammas, strict=True)
    ]
    return combine_deltas(
        pruned, weights, consensus=consensus, normalize=normalize, lambda_=lambda_
    )


def della_merge(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    epsilons: Sequence[float],
    *,
    consensus: bool,
    normalize: bool = True,
    lambda_: float = 1.0,
    rescale: bool = True,
    generator: torch.Generator,
) -> Tensor:
    """DELLA (della_linear without consensus): magnitude-ranked random drop, rescale, combine."""
    pruned = [
        della_prune(d, p, e, rescale=rescale, generator=generator)
        for d, p, e in zip(deltas, densities, epsilons, strict=True)
    ]
    return combine_deltas(
        pruned, weights, consensus=consensus, normalize=normalize, lambda_=lambda_
    )


def task_arithmetic_coefficients(
    model_params: Sequence[dict[str, Any]], global_params: dict[str, Any]
) -> Coefficients:
    """Task arithmetic as a weighted sum of base and sources: c_i = lambda w_i / D and
    c_base = 1 - sum_i c_i, with D = sum_i w_i when normalizing (|D| < 1e-8: 1), else 1."""
    _, normalized = linear_coefficients(model_params, global_params)
    cs = [global_params["lambda"] * c for c in normalized]
    return 1.0 - sum(cs), cs


# ------------------------------------------------------------------------ registration


def generator_for(inp: MergeInput, device: torch.device) -> torch.Generator:
    """The caller's per-tensor generator, or one seeded from a stable hash of the tensor name."""
    if inp.generator is not None:
        return inp.generator
    digest = hashlib.blake2b(inp.name.encode(), digest_size=8).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


def _check_della(density: float, epsilon: float, where: str) -> None:
    if density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        raise ConfigError(
            f"{where}: della needs density - epsilon > 0 and density + epsilon < 1 "
            f"(density={density}, epsilon={epsilon}); lower 'epsilon' or move 'density'"
        )


def _check_della_params(
    model_params: Sequence[dict[str, Any]], _g: dict[str, Any], where: str
) -> None:
    for i, p in enumerate(model_params):
        _check_della(p["density"], p["epsilon"], f"{where}, model {i}")


def _params(normalize: bool, rescale: bool, extra: tuple[Param, ...]) -> tuple[Param, ...]:
    return (
        Param("weight", None, True, help="coefficient of this model's task vector (required)"),
        Param("density", 1.0, True, low=0.0, high=1.0, low_open=True,
              help="fraction of the task vector kept (no effect without sparsification)"),
        *extra,
        Param("lambda", 1.0, False, help="scale of the merged task vector"),
        Param("normalize", normalize, False, bool, help="divide by the sum of the weights"),
        Param("rescale", rescale, False, bool,
              help="after sparsifying, rescale to the task vector's L1 norm"),
        Param("int8_mask", False, False, bool, help="accepted for mergekit; no effect here"),
    )  # fmt: skip


GAMMA = Param("gamma", 0.01, True, low=0.0, high=1.0, help="fraction of largest magnitudes dropped")
EPSILON = Param(
    "epsilon", 0.15, True, low=0.0, high=1.0, help="spread of keep probabilities by rank"
)


Check = Callable[[Sequence[dict[str, Any]], dict[str, Any], str], None]


def _adapter(
    kernel: Callable[..., Tensor], lists: tuple[str, ...], random: bool, check: Check | None
) -> Callable[[MergeInput], Tensor]:
    """(MergeInput) -> base + kernel(deltas, weights, *[per-model lists], **global params)."""
    takes_rescale = kernel is not task_arithmetic_merge

    def merge(inp: MergeInput) -> Tensor:
        if inp.base is None:
            raise ConfigError(f"tensor {inp.name!r}: this method needs a base_model")
        g = inp.global_params
        if check is not None:
            check(inp.model_params, g, f"tensor {inp.name!r}")
        kwargs: dict[str, Any] = {"normalize": g["normalize"], "lambda_": g["lambda"]}
        if takes_rescale:
            kwargs["rescale"] = g["rescale"]
        if random:
            kwargs["generator"] = generator_for(inp, inp.base.device)
        per_model = [inp.per_model(name) for name in lists]
        return inp.base + kernel(inp.deltas, inp.per_model("weight"), *per_model, **kwargs)

    return merge


def _register(
    name: str,
    kernel: Callable[..., Tensor],
    lists: tuple[str, ...],
    *,
    normalize: bool,
    rescale: bool,
    extra: tuple[Param, ...] = (),
    random: bool = False,
    check: Check | None = None,
    coefficients: Callable[[Sequence[dict[str, Any]], dict[str, Any]], Coefficients] | None = None,
    doc: str,
) -> None:
    register_method(
        MergeMethod(
            name=name,
            merge=_adapter(kernel, lists, random, check),
            params=_params(normalize, rescale, extra),
            needs_base=True,
            min_models=1,
            randomized=random,
            skips_base_model=True,
            check=check,
            coefficients=coefficients,
            doc=doc,
        )
    )


# name, kernel, per-model lists after weight; defaults as mergekit 0.1.5's registry.
_register(
    "task_arithmetic",
    task_arithmetic_merge,
    (),
    normalize=False,
    rescale=False,
    coefficients=task_arithmetic_coefficients,
    doc="base + lambda * sum_i w_i delta_i",
)
_register(
    "ties",
    ties_merge,
    ("density",),
    normalize=True,
    rescale=False,
    doc="magnitude top-k trim, sign election, disjoint mean",
)
_register(
    "dare_ties",
    partial(dare_merge, consensus=True),
    ("density",),
    normalize=False,
    rescale=True,
    random=True,
    doc="random drop with L1 rescale, then TIES sign election",
)
_register(
    "dare_linear",
    partial(dare_merge, consensus=False),
    ("density",),
    normalize=False,
    rescale=True,
    random=True,
    doc="random drop with L1 rescale, then task arithmetic",
)
_register(
    "breadcrumbs",
    partial(breadcrumbs_merge, consensus=False),
    ("density", "gamma"),
    normalize=False,
    rescale=False,
    extra=(GAMMA,),
    doc="drop outliers and small values, then task arithmetic",
)
_register(
    "breadcrumbs_ties",
    partial(breadcrumbs_merge, consensus=True),
    ("density", "gamma"),
    normalize=False,
    rescale=False,
    extra=(GAMMA,),
    doc="drop outliers and small values, then TIES sign election",
)
_register(
    "della",
    partial(della_merge, consensus=True),
    ("density", "epsilon"),
    normalize=True,
    rescale=True,
    extra=(EPSILON,),
    random=True,
    check=_check_della_params,
    doc="magnitude-ranked random drop with L1 rescale, then TIES sign election",
)
_register("della_linear", partial(della_merge, consensus=False), ("density", "epsilon"),
          normalize=False, rescale=True, extra=(EPSILON,), random=True, check=_check_della_params,
          doc="magnitude-ranked random drop with L1 rescale, then task arithmetic")  # fmt: skip

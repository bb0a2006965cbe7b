"""Task-vector methods: what mergekit's generalized task arithmetic family shares.

Every method of the family (task_arithmetic.py, ties.py, dare.py, breadcrumbs.py, della.py) is
one equation over the task vectors delta_i = x_i - base:

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
from typing import Any

import torch
from torch import Tensor

from evomerge.errors import ConfigError
from evomerge.methods.base import (
    Coefficients,
    MergeInput,
    MergeMethod,
    Param,
)
from evomerge.methods.consensus import sign_consensus
from evomerge.methods.linear import linear_merge

RESCALE_EPS = 1e-7  # mergekit rescaled_masked_tensor: no rescale when either L1 norm is below

Check = Callable[[Sequence[dict[str, Any]], dict[str, Any], str], None]
CoefficientsFn = Callable[[Sequence[dict[str, Any]], dict[str, Any]], Coefficients]


def rescale_l1(kept: Tensor, before: Tensor, after: Tensor) -> Tensor:
    """kept * |delta|_1 / |kept|_1 (DARE's rescale, matched in L1 as mergekit), unless tiny."""
    ok = (before >= RESCALE_EPS) & (after >= RESCALE_EPS)
    return kept * torch.where(ok, before / after, torch.ones_like(before))


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


def generator_for(inp: MergeInput, device: torch.device) -> torch.Generator:
    """The caller's per-tensor generator, or one seeded from a stable hash of the tensor name."""
    if inp.generator is not None:
        return inp.generator
    digest = hashlib.blake2b(inp.name.encode(), digest_size=8).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


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


def _adapter(
    kernel: Callable[..., Tensor],
    lists: tuple[str, ...],
    random: bool,
    check: Check | None,
    takes_rescale: bool,
) -> Callable[[MergeInput], Tensor]:
    """(MergeInput) -> base + kernel(deltas, weights, *[per-model lists], **global params)."""

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


def task_vector_method(
    name: str,
    kernel: Callable[..., Tensor],
    lists: tuple[str, ...],
    *,
    normalize: bool,
    rescale: bool,
    extra: tuple[Param, ...] = (),
    random: bool = False,
    check: Check | None = None,
    coefficients: CoefficientsFn | None = None,
    takes_rescale: bool = True,
    doc: str,
) -> MergeMethod:
    """The method running `kernel(deltas, weights, *per-model lists, normalize=, lambda_=[, rescale=]
    [, generator=])` as a method taking a base; `lists` name the per-model parameters after
    weight, `normalize`/`rescale` are the defaults (as mergekit 0.1.5's registry)."""
    return MergeMethod(
        name=name,
        merge=_adapter(kernel, lists, random, check, takes_rescale),
        params=_params(normalize, rescale, extra),
        needs_base=True,
        min_models=1,
        randomized=random,
        skips_base_model=True,
        check=check,
        coefficients=coefficients,
        doc=doc,
    )

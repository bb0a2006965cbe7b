"""NuSLERP (mergekit `nuslerp`): SLERP of two models, or of their task vectors, t from weights.

    t = w_1 / (w_0 + w_1)                            (0.5 when |w_0 + w_1| < 1e-6)
    merged = slerp_t(x_0, x_1)                        without base_model
    merged = base + slerp_t(x_0 - base, x_1 - base)   with base_model

slerp_t(a, b) = (sin((1-t) theta) a + sin(t theta) b) / sin(theta), cos(theta) = <a, b> / (|a||b|),
over the flattened tensors (`nuslerp_flatten`, the default), else one angle per row (the last
dimension) or, with `nuslerp_row_wise`, per column (dimension 0). Where 1 - cos^2 <= 1e-16
(collinear) it is the straight line (1-t) a + t b. Unlike `slerp`, the base is optional and is
the origin of the sphere, not one of its ends.
"""

from __future__ import annotations

import torch
from torch import Tensor

from evomerge.methods.base import MergeInput, MergeMethod, Param

COLINEAR_EPS = 1e-8  # collinear where 1 - cos^2 <= COLINEAR_EPS^2 (mergekit's value)
NORM_EPS = 1e-7  # norms are clamped to at least this before dividing (mergekit's value)


def nuslerp(
    t: float, v0: Tensor, v1: Tensor, *, flatten: bool = True, row_wise: bool = False
) -> Tensor:
    """slerp_t(v0, v1) with one angle per tensor (flatten), per column (row_wise) or per row."""
    shape = v0.shape
    if flatten:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    a_unit = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    b_unit = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    cos = (a_unit * b_unit).sum(dim=-1, keepdim=True).clamp(-1, 1)  # (..., 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))  # the unused branch stays finite
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * a + t * b, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp_t(w0: float, w1: float) -> float:
    """The interpolation factor from the two weights: w1 / (w0 + w1), 0.5 for a zero sum."""
    total = w0 + w1
    return 0.5 if abs(total) < 1e-6 else w1 / total


def _merge(inp: MergeInput) -> Tensor:
    t = nuslerp_t(*inp.per_model("weight"))
    g = inp.global_params
    kw = {"flatten": g["nuslerp_flatten"], "row_wise": g["nuslerp_row_wise"]}
    if inp.base is None:
        a, b = inp.tensors
        return nuslerp(t, a, b, **kw)
    d0, d1 = inp.deltas
    return inp.base + nuslerp(t, d0, d1, **kw)


NUSLERP = MergeMethod(
    name="nuslerp",
    merge=_merge,
    params=(
        Param("weight", None, True, help="t = w_1 / (w_0 + w_1) (required)"),
        Param("nuslerp_flatten", True, False, bool, help="one angle for the whole tensor"),
        Param(
            "nuslerp_row_wise",
            False,
            False,
            bool,
            help="without flatten: one angle per column (dim 0) instead of per row",
        ),
    ),
    min_models=2,
    max_models=2,
    skips_base_model=True,  # base_model, when set, is the origin, not a third input
    doc="SLERP of two models (of their task vectors with base_model), t = w_1 / (w_0 + w_1)",
)

"""SLERP between two models (mergekit `slerp`).

Convention: `MergeInput.tensors[0]` is the t = 0 end and must be the base model (the planner puts
the base first); `tensors[1]` is the t = 1 end. A t that varies by layer or tensor name is
resolved by the recipe layer; this kernel sees one scalar t per tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from evomerge.methods.base import MergeInput, MergeMethod, Param

DOT_THRESHOLD = 0.9995  # |cos| above this: interpolate linearly (mergekit's value)
EPS = 1e-8  # norms below this count as 1, as mergekit


def slerp_merge(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """(sin((1-t) theta) v0 + sin(t theta) v1) / sin(theta), cos(theta) = <v0, v1> / (|v0| |v1|).

    The tensors are flattened into one vector each; the coefficients multiply the unnormalized
    tensors. Falls back to (1-t) v0 + t v1 when |cos| > 0.9995 (collinear or antipodal).
    Everything stays on device (no host sync).
    """
    a, b = v0.reshape(-1), v1.reshape(-1)
    one = torch.ones((), dtype=v0.dtype, device=v0.device)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na, nb = torch.where(na > EPS, na, one), torch.where(nb > EPS, nb, one)
    dot = (torch.dot(a, b) / (na * nb)).clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    coef_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return coef_a * v0 + coef_b * v1


def _merge(inp: MergeInput) -> Tensor:
    v0, v1 = inp.tensors
    return slerp_merge(inp.global_params["t"], v0, v1)


SLERP = MergeMethod(
    name="slerp",
    merge=_merge,
    params=(Param("t", None, False, help="interpolation factor: 0 = base_model, 1 = the other"),),
    needs_base=True,
    min_models=2,
    max_models=2,
    doc="spherical interpolation from base_model (t=0) to the other model (t=1)",
)

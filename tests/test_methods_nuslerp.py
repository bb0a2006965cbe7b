"""nuslerp against a float64 reference angle by angle, its closed forms, and the base's role."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evomerge.methods import METHODS
from evomerge.methods.base import MergeInput
from evomerge.methods.nuslerp import nuslerp
from evomerge.plan import resolve_task
from tests.test_methods import make, run


def ref_slerp_rows(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One angle per row of 2-D arrays, from math on Python floats."""
    out = np.empty_like(a)
    for r in range(a.shape[0]):
        na, nb = math.sqrt(float(a[r] @ a[r])), math.sqrt(float(b[r] @ b[r]))
        cos = max(-1.0, min(1.0, float(a[r] @ b[r]) / (na * nb)))
        if 1 - cos * cos <= 1e-16:
            out[r] = (1 - t) * a[r] + t * b[r]
            continue
        th = math.acos(cos)
        out[r] = (math.sin((1 - t) * th) * a[r] + math.sin(t * th) * b[r]) / math.sin(th)
    return out


def ref_nuslerp(w, x0, x1, base=None, flatten=True, row_wise=False):
    t = 0.5 if abs(w[0] + w[1]) < 1e-6 else w[1] / (w[0] + w[1])
    a, b = (x0, x1) if base is None else (x0 - base, x1 - base)
    if flatten:
        out = ref_slerp_rows(t, a.reshape(1, -1), b.reshape(1, -1)).reshape(a.shape)
    elif row_wise:
        out = ref_slerp_rows(t, a.T, b.T).T
    else:
        out = ref_slerp_rows(t, a, b)
    return out if base is None else base + out


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize(("flatten", "row_wise"), [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("w", [(0.3, 0.9), (1.0, 0.0), (0.5, -0.5), (-0.4, 1.1)])
def test_nuslerp_matches_reference(with_base, flatten, row_wise, w):
    base, (x0, x1) = make(2, scale=1.0)
    gp = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    got = run("nuslerp", base if with_base else None, [x0, x1], [{"weight": v} for v in w], gp)
    want = ref_nuslerp(
        w, x0.numpy(), x1.numpy(), base.numpy() if with_base else None, flatten, row_wise
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_nuslerp_endpoints_and_midpoint():
    base, (x0, x1) = make(2, scale=1.0)
    torch.testing.assert_close(run("nuslerp", None, [x0, x1], [{"weight": 1}, {"weight": 0}]), x0)
    torch.testing.assert_close(run("nuslerp", None, [x0, x1], [{"weight": 0}, {"weight": 2}]), x1)
    # orthogonal task vectors of equal norm: the midpoint is (d0 + d1) / sqrt(2)
    d0 = torch.zeros(4, 4, dtype=torch.float64)
    d1 = torch.zeros(4, 4, dtype=torch.float64)
    d0[0, 0], d1[1, 1] = 3.0, 3.0
    mid = run("nuslerp", base[:4, :4], [base[:4, :4] + d0, base[:4, :4] + d1],
              [{"weight": 0.5}, {"weight": 0.5}])  # fmt: skip
    torch.testing.assert_close(mid, base[:4, :4] + (d0 + d1) / math.sqrt(2))


def test_nuslerp_identical_and_collinear():
    _, (x,) = make(1, scale=1.0)
    torch.testing.assert_close(run("nuslerp", None, [x, x], [{"weight": 0.2}, {"weight": 0.7}]), x)
    # collinear (b = 3a): the straight line, per row too
    t = 0.25
    for gp in ({}, {"nuslerp_flatten": False}):
        got = run("nuslerp", None, [x, 3 * x], [{"weight": 0.75}, {"weight": 0.25}], gp)
        torch.testing.assert_close(got, (1 - t) * x + t * 3 * x)


def test_nuslerp_zero_weight_sum_is_the_midpoint():
    _, (x0, x1) = make(2, scale=1.0)
    a = run("nuslerp", None, [x0, x1], [{"weight": 0.5}, {"weight": -0.5}])
    b = run("nuslerp", None, [x0, x1], [{"weight": 1.0}, {"weight": 1.0}])
    torch.testing.assert_close(a, b)


def test_nuslerp_base_and_resident_deltas():
    """With a base the kernel slerps the task vectors; resident deltas give the same."""
    base, (x0, x1) = make(2)
    m = METHODS.get("nuslerp")
    mp = [m.fill_model_params({"weight": w}, "t") for w in (0.4, 0.6)]
    gp = m.fill_global_params({}, "t")
    full = m.merge(MergeInput(base, [x0, x1], mp, gp))
    resident = m.merge(MergeInput(base, None, mp, gp, deltas=[x0 - base, x1 - base]))
    torch.testing.assert_close(full, resident)
    torch.testing.assert_close(full, base + nuslerp(0.6, x0 - base, x1 - base))
    assert not torch.allclose(full, nuslerp(0.6, x0, x1))


def test_plan_takes_base_model_out_of_the_inputs():
    """As in mergekit: base_model listed among nuslerp's models is the origin, not an input."""
    from evomerge.plan import OutTensor
    from evomerge.recipe import Recipe

    recipe = Recipe(
        models={"base": "/b", "a": "/a", "c": "/c"},
        base_model="base",
        sections=[{"method": "nuslerp",
                   "models": {"base": {}, "a": {"weight": 0.3}, "c": {"weight": 0.7}}}],
    )  # fmt: skip
    out = OutTensor("model.norm.weight", None, (4,), {"base": "n", "a": "n", "c": "n"})
    task = resolve_task(recipe, out)
    assert task.models == ("a", "c") and task.base == "base"

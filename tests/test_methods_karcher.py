"""karcher against a float64 reference iteration, its closed forms and its fixed point."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.test_methods import make, run


def ref_karcher(xs, max_iter=10, tol=1e-5):
    """The uniform Karcher mean on the sphere by Riemannian gradient steps, with Python floats
    for the angles, as described in the method's docstring."""
    if len(xs) == 1:
        return xs[0]
    flat = [x.reshape(-1) for x in xs]
    norms = [math.sqrt(float(f @ f)) for f in flat]
    units = [f / n for f, n in zip(flat, norms, strict=True) if n > tol]
    if not units:
        return np.zeros_like(xs[0])
    a = 1.0 / len(units)
    m = sum(a * u for u in units)
    nm = math.sqrt(float(m @ m))
    m = units[0].copy() if nm < tol else m / nm
    for _ in range(max_iter):
        v = np.zeros_like(m)
        for u in units:
            c = max(-1.0, min(1.0, float(m @ u)))
            th = math.acos(c)
            if th >= tol:
                v += a * th / math.sin(th) * (u - c * m)
        nv = math.sqrt(float(v @ v))
        if nv < tol:
            break
        m = math.cos(nv) * m + math.sin(nv) * v / nv
        m = m / math.sqrt(float(m @ m))
    return (sum(norms) / len(xs) * m).reshape(xs[0].shape)


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize(("max_iter", "tol"), [(10, 1e-5), (0, 1e-5), (3, 1e-9), (50, 1e-12)])
@pytest.mark.parametrize("shape", [(6, 9), (13,)])
def test_karcher_matches_reference(n, max_iter, tol, shape):
    _, xs = make(n, shape=shape, scale=1.0)
    got = run("karcher", None, xs, None, {"max_iter": max_iter, "tol": tol})
    want = ref_karcher([x.numpy() for x in xs], max_iter, tol)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_karcher_converges_to_the_fixed_point():
    """At the Karcher mean m the gradient sum_i theta_i / sin(theta_i) (u_i - cos_i m) is 0."""
    _, xs = make(4, shape=(30,), scale=1.0)
    m = run("karcher", None, xs, None, {"max_iter": 200, "tol": 1e-14}).reshape(-1)
    m = m / m.norm()
    grad = torch.zeros_like(m)
    for x in xs:
        u = x.reshape(-1) / x.norm()
        c = float(m @ u)
        th = math.acos(c)
        grad += th / math.sin(th) * (u - c * m)
    assert grad.norm() < 1e-10


def test_karcher_closed_forms():
    _, (x,) = make(1)
    assert run("karcher", None, [x]) is x
    torch.testing.assert_close(run("karcher", None, [x, x.clone(), x.clone()]), x)
    # two directions: the geodesic midpoint, scaled by the mean norm
    e0, e1 = torch.eye(2, dtype=torch.float64)
    got = run("karcher", None, [2 * e0, 4 * e1])
    torch.testing.assert_close(got, 3 * (e0 + e1) / math.sqrt(2))
    # three orthogonal directions: the symmetric centre
    eye = torch.eye(3, dtype=torch.float64)
    got = run("karcher", None, list(eye), None, {"max_iter": 100, "tol": 1e-12})
    torch.testing.assert_close(got, torch.ones(3, dtype=torch.float64) / math.sqrt(3))


def test_karcher_zero_models_count_in_the_norm_only():
    _, (x,) = make(1)
    zero = torch.zeros_like(x)
    torch.testing.assert_close(run("karcher", None, [x, zero]), x / 2)
    assert torch.equal(run("karcher", None, [zero, zero]), zero)


def test_karcher_ignores_the_base():
    base, xs = make(3)
    torch.testing.assert_close(run("karcher", base, xs), run("karcher", None, xs))

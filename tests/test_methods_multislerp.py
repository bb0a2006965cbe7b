"""multislerp against mergekit's tangent-space algorithm in float64, and its closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evomerge.errors import ConfigError
from tests.test_methods import make, run


def ref_multislerp(xs, weights, base=None, normalize=True, eps=1e-8):
    """The algorithm as written in mergekit: units, tangent space at the weighted mean,
    average there, exponential map back, scale by the weighted norm."""
    if len(xs) == 1:
        return xs[0]
    vs = [(x if base is None else x - base).reshape(-1) for x in xs]
    w = np.array(weights, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    norms = np.array([math.sqrt(float(v @ v)) for v in vs])
    units = [v / (n + eps) for v, n in zip(vs, norms, strict=True)]
    mean = sum(wi * u for wi, u in zip(w, units, strict=True))
    mean = mean / math.sqrt(float(mean @ mean))
    tangents = [u - float(u @ mean) * mean for u in units]
    avg = sum(wi * tv for wi, tv in zip(w, tangents, strict=True))
    tn = math.sqrt(float(avg @ avg)) + eps
    out = mean * math.cos(tn) + avg * (math.sin(tn) / tn)
    out = (out * float(norms @ w)).reshape(xs[0].shape)
    return out if base is None else base + out


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weights", [[0.3, 0.9], [0.5, 0.2, 0.3], [1.0, -0.3, 0.6, 0.2]])
@pytest.mark.parametrize("shape", [(6, 9), (13,)])
def test_multislerp_matches_reference(with_base, normalize, weights, shape):
    base, xs = make(len(weights), shape=shape, scale=1.0)
    got = run("multislerp", base if with_base else None, xs,
              [{"weight": w} for w in weights], {"normalize_weights": normalize})  # fmt: skip
    want = ref_multislerp(
        [x.numpy() for x in xs], weights, base.numpy() if with_base else None, normalize
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_multislerp_one_model_and_identical_models():
    base, (x,) = make(1)
    assert run("multislerp", base, [x], [{"weight": 0.3}]) is x
    got = run("multislerp", None, [x, x, x], [{"weight": w} for w in (0.2, 0.5, 0.3)])
    torch.testing.assert_close(got, x, rtol=1e-7, atol=1e-7)  # up to eps / |x|


def test_multislerp_is_the_slerp_midpoint_for_two_equal_norms():
    """Two models of one norm with equal weights: the geodesic midpoint (nuslerp at t = 0.5)."""
    _, (x0, x1) = make(2, scale=1.0)
    x1 = x1 * (x0.norm() / x1.norm())
    got = run("multislerp", None, [x0, x1], [{"weight": 1.0}, {"weight": 1.0}])
    want = run("nuslerp", None, [x0, x1], [{"weight": 1.0}, {"weight": 1.0}])
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    # orthogonal unit vectors, weights 1 : 3: direction normalize(u0 + 3 u1), norm 1
    e0, e1 = torch.eye(2, dtype=torch.float64)
    got = run("multislerp", None, [e0, e1], [{"weight": 1.0}, {"weight": 3.0}])
    torch.testing.assert_close(got, torch.tensor([1.0, 3.0], dtype=torch.float64) / math.sqrt(10))


def test_multislerp_antipodal_inputs():
    _, (x,) = make(1)
    # two models: mergekit's linear fallback (here exactly zero)
    got = run("multislerp", None, [x, -x], [{"weight": 0.5}, {"weight": 0.5}])
    torch.testing.assert_close(got, torch.zeros_like(x))
    with pytest.raises(ConfigError, match=r"multislerp.*zero"):
        run("multislerp", None, [x, -x, x.flip(0)], [{"weight": w} for w in (0.5, 0.5, 0.0)])


def test_multislerp_zero_weight_sum_raises_when_normalizing():
    _, xs = make(2)
    with pytest.raises(ConfigError, match="normalize_weights"):
        run("multislerp", None, xs, [{"weight": 0.5}, {"weight": -0.5}])
    run("multislerp", None, xs, [{"weight": 0.5}, {"weight": -0.5}], {"normalize_weights": False})

"""nearswap against an element-by-element float64 reference, and its closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.errors import ConfigError
from tests.test_methods import make, run


@pytest.mark.parametrize("t", [0.0, 0.01, 0.05, 0.2, 10.0, -0.1])
@pytest.mark.parametrize("shape", [(6, 9), (13,)])
def test_nearswap_matches_reference(t, shape):
    base, (x,) = make(1, shape=shape)
    got = run("nearswap", base, [x], None, {"t": t})
    b, y = base.numpy().reshape(-1), x.numpy().reshape(-1)
    want = np.empty_like(b)
    for j in range(b.size):
        w = min(1.0, max(0.0, t / max(abs(b[j] - y[j]), 1e-6)))
        want[j] = w * y[j] + (1 - w) * b[j]
    np.testing.assert_allclose(got.numpy(), want.reshape(shape), rtol=1e-12, atol=1e-14)


def test_nearswap_closed_forms():
    base, (x,) = make(1)
    torch.testing.assert_close(run("nearswap", base, [x], None, {"t": 0.0}), base)
    far = float((x - base).abs().max())
    torch.testing.assert_close(run("nearswap", base, [x], None, {"t": far}), x)
    torch.testing.assert_close(run("nearswap", base, [base.clone()], None, {"t": 0.3}), base)
    # entries within t are swapped, the others move by exactly t toward x
    got = run("nearswap", base, [x], None, {"t": 0.05})
    near = (x - base).abs() <= 0.05
    torch.testing.assert_close(got[near], x[near])
    torch.testing.assert_close((got - base)[~near].abs(), torch.full_like(got[~near], 0.05))


def test_nearswap_needs_t():
    base, xs = make(1)
    with pytest.raises(ConfigError, match="needs parameter 't'"):
        run("nearswap", base, xs)

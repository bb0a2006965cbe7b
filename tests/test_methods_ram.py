"""ram and ramplus_tl against element-by-element float64 references, and their closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_methods import make, run


def ref_ram(base, xs, epsilon, plus=None):
    """plus = (r, alpha) for ramplus_tl."""
    deltas = [(x - base).reshape(-1) for x in xs]
    size = deltas[0].size
    nz = [[abs(d[j]) > epsilon for j in range(size)] for d in deltas]
    count = [sum(n[j] for n in nz) for j in range(size)]
    lam = [1.0] * len(xs)
    if plus is not None:
        r, alpha = plus
        for i, n in enumerate(nz):
            shared = sum(1 for j in range(size) if n[j] and count[j] > 1)
            unique = sum(1 for j in range(size) if n[j] and count[j] == 1)
            rho = np.float32(shared) / np.float32(max(unique, epsilon))  # float32, as mergekit
            lam[i] = float(np.float32(1) + np.float32(r) * np.clip(rho, 0, alpha))
    out = np.zeros(size)
    for j in range(size):
        for i, d in enumerate(deltas):
            if nz[i][j]:
                out[j] += d[j] * lam[i] if count[j] == 1 else d[j] / count[j]
    return base + out.reshape(base.shape)


@pytest.mark.parametrize("epsilon", [1e-5, 0.05, 0.12])
@pytest.mark.parametrize(("n", "shape"), [(1, (6, 9)), (3, (6, 9)), (4, (23,))])
def test_ram_matches_reference(epsilon, n, shape):
    base, xs = make(n, shape=shape)
    got = run("ram", base, xs, None, {"epsilon": epsilon})
    want = ref_ram(base.numpy(), [x.numpy() for x in xs], epsilon)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("r", "alpha", "epsilon"), [(0.1, 0.2, 1e-5), (0.5, 2.0, 0.08), (1.0, 0.3, 0.12)]
)
@pytest.mark.parametrize(("n", "shape"), [(2, (6, 9)), (3, (23,))])
def test_ramplus_tl_matches_reference(r, alpha, epsilon, n, shape):
    base, xs = make(n, shape=shape)
    got = run("ramplus_tl", base, xs, None, {"r": r, "alpha": alpha, "epsilon": epsilon})
    want = ref_ram(base.numpy(), [x.numpy() for x in xs], epsilon, (r, alpha))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-14)


def sparse_disjoint(n: int, size: int = 60):
    """Task vectors that touch disjoint entries: every change is unique to one model."""
    base = torch.randn(size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xs = []
    for i in range(n):
        d = torch.zeros(size, dtype=torch.float64)
        d[i::n] = 0.5 + i
        xs.append(base + d)
    return base, xs


def test_ram_closed_forms():
    base, (x,) = make(1)
    torch.testing.assert_close(run("ram", base, [x]), x)
    torch.testing.assert_close(run("ram", base, [x, x.clone(), x.clone()]), x)
    # disjoint changes add up whole (task arithmetic with weight 1), not diluted by 1/n
    base, xs = sparse_disjoint(3)
    torch.testing.assert_close(run("ram", base, xs), base + sum(x - base for x in xs))
    # below epsilon nothing counts
    torch.testing.assert_close(run("ram", base, xs, None, {"epsilon": 3.0}), base)


def test_ramplus_tl_closed_forms():
    base, xs = make(3)
    ram = run("ram", base, xs, None, {"epsilon": 0.08})
    no_gain = run("ramplus_tl", base, xs, None, {"epsilon": 0.08, "r": 0.0})
    torch.testing.assert_close(no_gain, ram)
    # disjoint changes: no overlap, rho = 0, lambda = 1: exactly ram
    base, xs = sparse_disjoint(3)
    torch.testing.assert_close(run("ramplus_tl", base, xs), run("ram", base, xs))
    # dense changes: every entry overlaps, so there are no unique entries to scale
    base, xs = make(3)
    torch.testing.assert_close(run("ramplus_tl", base, xs, None, {"r": 5.0}), run("ram", base, xs))

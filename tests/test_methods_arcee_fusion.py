"""arcee_fusion against a row-by-row float64 reference, its closed forms, and exact quartiles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evomerge.methods.arcee_fusion import fence
from tests.test_methods import make, run


def ref_arcee_fusion(base: np.ndarray, x: np.ndarray) -> np.ndarray:
    rows_b = base.reshape(1, -1) if base.ndim == 1 else base
    rows_x = x.reshape(rows_b.shape)
    imp = np.empty_like(rows_b)
    for r in range(rows_b.shape[0]):
        ex = [math.exp(v) for v in rows_x[r]]
        eb = [math.exp(v) for v in rows_b[r]]
        p = [e / sum(ex) + 1e-8 for e in ex]
        q = [e / sum(eb) + 1e-8 for e in eb]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        imp[r] = np.abs(rows_x[r] - rows_b[r]) * kl
    s = sorted(imp.reshape(-1))
    last = len(s) - 1
    threshold = s[last // 2] + 1.5 * (s[3 * last // 4] - s[last // 4])
    keep = imp >= threshold
    return np.where(keep, rows_x, rows_b).reshape(base.shape)


@pytest.mark.parametrize("shape", [(6, 9), (13,), (40, 7)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_arcee_fusion_matches_reference(shape, seed):
    base, (x,) = make(1, shape=shape, seed=seed, scale=0.5)
    got = run("arcee_fusion", base, [x])
    want = ref_arcee_fusion(base.numpy(), x.numpy())
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-14)
    taken = int((got != base).sum())
    assert taken < x.numel() and (taken > 0 or len(shape) == 1)  # outliers: some, not all


def test_arcee_fusion_closed_forms():
    base, (x,) = make(1)
    torch.testing.assert_close(run("arcee_fusion", base, [base.clone()]), base)
    got = run("arcee_fusion", base, [x])
    taken = got != base
    torch.testing.assert_close(got[taken], x[taken])  # entries are taken whole or not at all


def test_fence_is_exact_on_large_tensors():
    """Over 1M entries mergekit samples the quartiles at random (unseeded); ours are exact."""
    g = torch.Generator().manual_seed(0)
    v = torch.rand(1_200_001, generator=g) ** 3
    s = np.sort(v.numpy())
    last = v.numel() - 1
    want = np.float32(s[last // 2]) + np.float32(1.5) * (s[3 * last // 4] - s[last // 4])
    assert float(fence(v)) == float(want)

"""sce against an element-by-element float64 reference, and its closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_methods import make, run


def ref_sce(base, xs, select_topk=1.0):
    n = len(xs)
    deltas = [(x - base).reshape(-1) for x in xs]
    size = deltas[0].size
    if select_topk < 1:
        var = [float(np.var([d[j] for d in deltas])) for j in range(size)]
        nonzero = sum(v != 0 for v in var)
        k = int(np.float32(nonzero) * np.float32(select_topk)) if select_topk > 0 else 0  # fp32
        kept = set(sorted(range(size), key=lambda j: (-var[j], j))[:k])  # ties: lowest index
        deltas = [np.array([d[j] if j in kept else 0.0 for j in range(size)]) for d in deltas]
    energy = [float(np.mean(d**2)) for d in deltas]
    total = sum(energy)
    w = [1 / n] * n if abs(total) < 1e-6 else [e / total for e in energy]
    out = np.zeros(size)
    for j in range(size):
        elected = 1.0 if sum(d[j] for d in deltas) >= 0 else -1.0
        agree = [np.sign(d[j]) == elected for d in deltas]
        num = sum(wi * d[j] for wi, d, a in zip(w, deltas, agree, strict=True) if a)
        den = sum(wi for wi, a in zip(w, agree, strict=True) if a)
        out[j] = num / max(den, 1e-6)
    return base + out.reshape(base.shape)


@pytest.mark.parametrize("select_topk", [1.0, 0.7, 0.3, 0.05, 0.0])
@pytest.mark.parametrize(("n", "shape"), [(1, (6, 9)), (3, (6, 9)), (4, (23,))])
def test_sce_matches_reference(select_topk, n, shape):
    base, xs = make(n, shape=shape)
    got = run("sce", base, xs, None, {"select_topk": select_topk})
    want = ref_sce(base.numpy(), [x.numpy() for x in xs], select_topk)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_sce_closed_forms():
    base, (x,) = make(1)
    torch.testing.assert_close(run("sce", base, [x]), x)  # one model: its task vector whole
    torch.testing.assert_close(run("sce", base, [x, x.clone(), x.clone()]), x)
    torch.testing.assert_close(run("sce", base, [x, x], None, {"select_topk": 0.0}), base)
    # opposite task vectors: the + sign wins every tie of the election, so |delta| is taken
    zero, d = torch.zeros_like(base), x - base  # a zero base keeps the deltas exact negatives
    torch.testing.assert_close(run("sce", zero, [d, -d]), d.abs())


def test_sce_select_keeps_exactly_k_with_tied_variances():
    base = torch.zeros(10, 10, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(-2, 3, (10, 10), generator=g).double() for _ in range(2)]
    got = run("sce", base, xs, None, {"select_topk": 0.25})
    want = ref_sce(base.numpy(), [x.numpy() for x in xs], 0.25)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    var = torch.stack(xs).var(dim=0, unbiased=False)
    assert int(((got != 0) & (var > 0)).sum()) <= int(0.25 * int((var > 0).sum()))


def test_sce_energy_weights_favour_the_larger_task_vector():
    base, (x,) = make(1)
    d = x - base
    small, big = d * 0.1, d.flip(0) * 2  # different directions
    got = run("sce", base, [base + small, base + big]) - base
    e_small, e_big = small.square().mean(), big.square().mean()
    w_small, w_big = e_small / (e_small + e_big), e_big / (e_small + e_big)
    agree_both = (torch.sign(small) == torch.sign(big)) & (small != 0)
    both = (w_small * small + w_big * big) / (w_small + w_big)
    torch.testing.assert_close(got[agree_both], both[agree_both])


@pytest.mark.parametrize("small", [1e-2, 1e-4])
def test_sce_divisor_floor(small):
    """Where only a model of tiny energy share w changed an entry, the entry is w d / max(w,
    1e-6): kept whole while w > 1e-6, shrunk by w / 1e-6 below (mergekit's floor)."""
    base = torch.zeros(40, dtype=torch.float64)
    big, tiny = base.clone(), base.clone()
    big[:20], tiny[20:] = 1.0, small
    got = run("sce", base, [big, tiny])
    w = small**2 / (1 + small**2)
    torch.testing.assert_close(got[:20], big[:20])
    torch.testing.assert_close(got[20:], tiny[20:] * w / max(w, 1e-6))
    assert (w > 1e-6) == bool(torch.allclose(got[20:], tiny[20:]))

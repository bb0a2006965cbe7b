"""Merge kernels against independent float64 references, closed forms, and mergekit itself."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.errors import ConfigError
from evomerge.methods import METHODS
from evomerge.methods.base import MergeInput

F64 = torch.float64

# ---------------------------------------------------------------- helpers


def make(n: int, shape=(6, 9), seed: int = 0, dtype=F64, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=F64)
    xs = [base + scale * torch.randn(shape, generator=g, dtype=F64) for _ in range(n)]
    return base.to(dtype), [x.to(dtype) for x in xs]


def run(name: str, base, xs, model_params=None, global_params=None, *, seed=None, tensor_name="t"):
    """Fill defaults and validate as the planner does, then merge."""
    m = METHODS.get(name)
    model_params = model_params or [{} for _ in xs]
    mp = [m.fill_model_params(p, "test") for p in model_params]
    gp = m.fill_global_params(global_params or {}, "test")
    m.check_params(mp, gp, "test")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return m.merge(MergeInput(base, xs, mp, gp, generator=gen, name=tensor_name))


def rand_u(seed: int, shape, densities) -> list[np.ndarray | None]:
    """The documented draw contract: float32 uniforms per model in order, none for density >= 1."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.rand(shape, generator=g, dtype=torch.float32).double().numpy() if p < 1 else None
        for p in densities
    ]


# ------------------------------------------------------- float64 references (numpy, loops)


def ref_rescale(d: np.ndarray, kept: np.ndarray, rescale: bool) -> np.ndarray:
    before, after = np.abs(d).sum(), np.abs(kept).sum()
    if not rescale or before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def ref_magnitude(d, density, rescale=False):
    if density >= 1:
        return d
    flat = d.reshape(-1)
    k = max(1, int(density * flat.size))
    order = sorted(range(flat.size), key=lambda i: -abs(flat[i]))[:k]
    kept = np.zeros_like(flat)
    kept[order] = flat[order]
    return ref_rescale(flat, kept, rescale).reshape(d.shape)


def ref_breadcrumbs(d, density, gamma, rescale=False):
    if density >= 1:
        return d
    flat = d.reshape(-1)
    n = flat.size
    keep_n, top_n = int(density * n), int(gamma * n)
    bot = max(0, n - keep_n - top_n)
    asc = sorted(range(n), key=lambda i: abs(flat[i]))[bot : bot + keep_n]
    kept = np.zeros_like(flat)
    kept[asc] = flat[asc]
    return ref_rescale(flat, kept, rescale).reshape(d.shape)


def ref_dare(d, density, u, rescale=True):
    if density >= 1:
        return d
    return ref_rescale(d, np.where(u < density, d, 0.0), rescale)


def ref_della(d, density, eps, u, rescale=True):
    if density >= 1:
        return d
    rows = d.reshape(1, -1) if d.ndim == 1 else d
    probs = np.zeros_like(rows)
    for r in range(rows.shape[0]):
        asc = sorted(range(rows.shape[1]), key=lambda j: abs(rows[r, j]))
        for rank, j in enumerate(asc):
            probs[r, j] = density - eps + 2 * eps * rank / (rows.shape[1] - 1)
    kept = np.where(u.reshape(rows.shape) < probs, rows, 0.0)
    return ref_rescale(rows, kept, rescale).reshape(d.shape)


def ref_combine(pruned, weights, consensus, normalize, lam):
    """Element by element, as the TIES paper reads."""
    shape = pruned[0].shape
    flat = [p.reshape(-1) for p in pruned]
    out = np.zeros(flat[0].size)
    for e in range(out.size):
        wd = [w * f[e] for w, f in zip(weights, flat, strict=True)]
        if consensus:
            elected = 1.0 if sum(wd) >= 0 else -1.0
            agree = [np.sign(x) == elected for x in wd]
            total = sum(x for x, a in zip(wd, agree, strict=True) if a)
            div = sum(w for w, a in zip(weights, agree, strict=True) if a) or 1.0
        else:
            total, div = sum(wd), sum(weights)
            div = div if abs(div) >= 1e-8 else 1.0
        out[e] = lam * (total / div if normalize else total)
    return out.reshape(shape)


def ref_slerp(t, v0, v1):
    a, b = v0.reshape(-1), v1.reshape(-1)
    dot = float(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b)))
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def ref_model_stock(base, xs, filter_wise=False):
    n = len(xs)
    if filter_wise:
        b2 = base.reshape(1, -1) if base.ndim == 1 else base
        offs = [(x.reshape(b2.shape) - b2) for x in xs]
        out = np.empty_like(b2)
        for r in range(b2.shape[0]):
            out[r] = _stock_row(b2[r], [o[r] for o in offs], n)
        return out.reshape(base.shape)
    return _stock_row(base.reshape(-1), [(x - base).reshape(-1) for x in xs], n).reshape(base.shape)


def _stock_row(b, offs, n):
    coss = [
        np.clip(np.dot(p, q) / max(np.linalg.norm(p) * np.linalg.norm(q), 1e-6), -1, 1)
        for p, q in itertools.combinations(offs, 2)
    ]
    cos = float(np.mean(coss))
    t = n * cos / (1 + (n - 1) * cos)
    return t * (b + np.mean(offs, axis=0)) + (1 - t) * b


# ---------------------------------------------------------------- reference comparisons

W3 = [0.6, 0.3, -0.25]
D3 = [0.5, 0.8, 0.3]


def np_deltas(base, xs):
    return [(x - base).numpy() for x in xs]


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_reference(normalize):
    _, xs = make(3)
    got = run("linear", None, xs, [{"weight": w} for w in W3], {"normalize": normalize})
    want = sum(w * x.numpy() for w, x in zip(W3, xs, strict=True))
    want = want / sum(W3) if normalize else want
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("name", "gp"),
    [
        ("task_arithmetic", {"lambda": 0.7}),
        ("task_arithmetic", {"normalize": True}),
        ("ties", {}),
        ("ties", {"normalize": False, "rescale": True, "lambda": 1.3}),
        ("breadcrumbs", {}),
        ("breadcrumbs_ties", {"normalize": True, "rescale": True}),
    ],
)
def test_deterministic_delta_methods_match_reference(name, gp):
    base, xs = make(3)
    gammas = [0.1, 0.0, 0.2]
    mp = [{"weight": w, "density": p} for w, p in zip(W3, D3, strict=True)]
    if name.startswith("breadcrumbs"):
        mp = [dict(p, gamma=g) for p, g in zip(mp, gammas, strict=True)]
    m = METHODS.get(name)
    g = m.fill_global_params(gp, "test")
    deltas = np_deltas(base, xs)
    if name == "task_arithmetic":
        pruned, consensus = deltas, False
    elif name == "ties":
        pruned, consensus = (
            [ref_magnitude(d, p, g["rescale"]) for d, p in zip(deltas, D3, strict=True)],
            True,
        )
    else:
        pruned = [
            ref_breadcrumbs(d, p, gm, g["rescale"])
            for d, p, gm in zip(deltas, D3, gammas, strict=True)
        ]
        consensus = name.endswith("ties")
    want = base.numpy() + ref_combine(pruned, W3, consensus, g["normalize"], g["lambda"])
    got = run(name, base, xs, mp, gp)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "della", "della_linear"])
@pytest.mark.parametrize("shape", [(6, 9), (40,)])
def test_random_methods_match_reference(name, shape):
    base, xs = make(3, shape=shape)
    densities = [0.5, 1.0, 0.4]  # the middle model draws nothing
    eps = [0.1, 0.15, 0.3]
    mp = [{"weight": w, "density": p} for w, p in zip(W3, densities, strict=True)]
    if name.startswith("della"):
        mp = [dict(p, epsilon=e) for p, e in zip(mp, eps, strict=True)]
    g = METHODS.get(name).fill_global_params({}, "test")
    us = rand_u(7, shape, densities)
    deltas = np_deltas(base, xs)
    if name.startswith("dare"):
        pruned = [ref_dare(d, p, u) for d, p, u in zip(deltas, densities, us, strict=True)]
    else:
        pruned = [
            ref_della(d, p, e, u) for d, p, e, u in zip(deltas, densities, eps, us, strict=True)
        ]
    want = base.numpy() + ref_combine(
        pruned, W3, "ties" in name or name == "della", g["normalize"], 1.0
    )
    got = run(name, base, xs, mp, seed=7)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_reference(t):
    base, (x,) = make(1, scale=1.0)
    got = run("slerp", base, [base, x], [{}, {}], {"t": t})
    np.testing.assert_allclose(
        got.numpy(), ref_slerp(t, base.numpy(), x.numpy()), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize(("n", "shape"), [(2, (6, 9)), (3, (6, 9)), (4, (17,))])
def test_model_stock_matches_reference(filter_wise, n, shape):
    base, xs = make(n, shape=shape)
    got = run("model_stock", base, xs, None, {"filter_wise": filter_wise})
    want = ref_model_stock(base.numpy(), [x.numpy() for x in xs], filter_wise)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- closed forms


def test_linear_of_identical_models_is_that_model():
    _, (x,) = make(1)
    got = run("linear", None, [x, x, x], [{"weight": w} for w in (0.2, 0.5, 0.3)])
    torch.testing.assert_close(got, x, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_density_one_single_model_is_task_arithmetic(normalize):
    base, xs = make(1)
    gp = {"normalize": normalize, "lambda": 0.8}
    ties = run("ties", base, xs, [{"weight": 0.7, "density": 1.0}], gp)
    ta = run("task_arithmetic", base, xs, [{"weight": 0.7}], gp)
    torch.testing.assert_close(ties, ta, rtol=1e-14, atol=1e-14)


def test_ties_keeps_exactly_k_with_ties_in_magnitude():
    base = torch.zeros(10, 10, dtype=F64)
    x = torch.randint(-2, 3, (10, 10)).to(F64)  # many equal magnitudes
    got = run("ties", base, [x], [{"weight": 1.0, "density": 0.33}])
    assert int((got != 0).sum()) == 33
    kept = got[got != 0].abs()
    assert kept.min() >= x.abs().flatten().sort(descending=True).values[32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("k", [0, 1, 7, 500, 999, 1000])
def test_top_k_rule_is_the_stable_top_k(dtype, k):
    """TIES' trim as a threshold rule: exactly k kept, ties at the threshold by lowest index,
    i.e. the first k of a stable sort by descending value (radix select for float32, bf16;
    numpy partition for float64)."""
    from evomerge.methods.topk import top_k_rule

    g = torch.Generator().manual_seed(k)
    values = torch.randint(0, 40, (1000,), generator=g).to(dtype) / 7  # many ties in bf16
    ref = torch.zeros(1000, dtype=torch.bool)
    order = sorted(range(1000), key=lambda i: (-float(values[i]), i))
    ref[order[:k]] = True
    assert torch.equal(top_k_rule(values, k).mask(values), ref)


def test_top_k_rule_spread_over_many_exponents():
    """The radix select's two levels: magnitudes from 1e-30 to 1e30 and ranks all over."""
    from evomerge.methods.topk import kth_largest

    g = torch.Generator().manual_seed(3)
    values = torch.exp(torch.randn(20_000, generator=g) * 30).float()
    ordered = values.double().sort(descending=True).values
    for k in (1, 2, 137, 10_000, 19_999, 20_000):
        assert kth_largest(values, k) == float(ordered[k - 1])


@pytest.mark.parametrize("chunk", [1, 5, 16, None])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_ties_chunked_kernel_matches_reference_with_tied_magnitudes(chunk, rescale, dtype):
    """The chunked consensus kernel, with ties at every model's threshold falling inside
    chunks and at their edges, against the element-by-element float64 reference."""
    from evomerge.methods.ties import ties_merge

    g = torch.Generator().manual_seed(5)
    deltas = [torch.randint(-4, 5, (9, 7), generator=g).to(dtype) / 4 for _ in range(3)]
    weights, densities = [0.6, 0.3, -0.25], [0.5, 0.8, 0.3]
    got = ties_merge(deltas, weights, densities, rescale=rescale, lambda_=0.9, chunk=chunk)
    d_np = [d.double().numpy() for d in deltas]
    # Python's sort is stable: ref_magnitude breaks ties by lowest index too
    pruned = [ref_magnitude(d, p, rescale) for d, p in zip(d_np, densities, strict=True)]
    want = ref_combine(pruned, weights, True, True, 0.9)
    tol = 1e-12 if dtype == F64 else 1e-6
    np.testing.assert_allclose(got.double().numpy(), want, rtol=tol, atol=tol)


def test_slerp_endpoints_and_colinear_fallback():
    base, (x,) = make(1, scale=1.0)
    torch.testing.assert_close(run("slerp", base, [base, x], None, {"t": 0.0}), base)
    torch.testing.assert_close(run("slerp", base, [base, x], None, {"t": 1.0}), x)
    # collinear: 3 * base points the same way: slerp must be the straight line
    got = run("slerp", base, [base, 3 * base], None, {"t": 0.25})
    torch.testing.assert_close(got, 0.75 * base + 0.25 * 3 * base)
    anti = run("slerp", base, [base, -2 * base], None, {"t": 0.5})
    torch.testing.assert_close(anti, -0.5 * base)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_density_one_is_deterministic_counterpart(name):
    base, xs = make(3)
    mp = [{"weight": w, "density": 1.0} for w in W3]
    gp = {"normalize": True}
    other = "task_arithmetic" if name == "dare_linear" else "ties"
    a, b = run(name, base, xs, mp, gp, seed=1), run(other, base, xs, mp, gp)
    torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("name", [n for n in METHODS if METHODS.get(n).randomized])
def test_random_methods_seeded(name):
    base, xs = make(2, shape=(20, 20))
    mp = [{"weight": 0.5, "density": 0.5}, {"weight": 0.5, "density": 0.6}]
    a1, a2 = run(name, base, xs, mp, seed=3), run(name, base, xs, mp, seed=3)
    b = run(name, base, xs, mp, seed=4)
    assert torch.equal(a1, a2) and not torch.equal(a1, b)
    # no generator: seeded from the tensor name, so stable per name and different across names
    n1, n2 = (
        run(name, base, xs, mp, tensor_name="a.weight"),
        run(name, base, xs, mp, tensor_name="a.weight"),
    )
    n3 = run(name, base, xs, mp, tensor_name="b.weight")
    assert torch.equal(n1, n2) and not torch.equal(n1, n3)
    # fp32 and fp64 compute draw the same masks
    f32 = run(name, base.float(), [x.float() for x in xs], mp, seed=3)
    torch.testing.assert_close(f32.double(), a1, rtol=1e-5, atol=1e-5)


def test_dare_keep_rate_and_l1_rescale():
    base = torch.zeros(200, 100, dtype=F64)
    x = torch.randn(200, 100, generator=torch.Generator().manual_seed(0), dtype=F64)
    got = run("dare_linear", base, [x], [{"weight": 1.0, "density": 0.3}], seed=0)
    kept = got != 0
    assert abs(kept.double().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(got.abs().sum(), x.abs().sum())
    ratio = got[kept] / x[kept]
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))


def test_della_keeps_large_magnitudes_more_often():
    base = torch.zeros(50, 400, dtype=F64)
    x = torch.randn(50, 400, generator=torch.Generator().manual_seed(1), dtype=F64)
    got = run("della_linear", base, [x], [{"weight": 1.0, "density": 0.5, "epsilon": 0.4}], seed=0)
    mags = x.abs()
    big, small = mags > mags.quantile(0.8), mags < mags.quantile(0.2)
    rate_big, rate_small = (got[big] != 0).double().mean(), (got[small] != 0).double().mean()
    assert rate_big > 0.8 and rate_small < 0.2  # p ~ 0.82..0.9 vs 0.1..0.18


def test_model_stock_identical_offsets_gives_the_model():
    base, (x,) = make(1)
    # cos = 1 -> t = N / N = 1 -> result is the (common) fine-tune
    got = run("model_stock", base, [x, x.clone(), x.clone()])
    torch.testing.assert_close(got, x, rtol=1e-12, atol=1e-12)


def test_model_stock_opposite_offsets_keep_base():
    base, (x,) = make(1)
    got = run("model_stock", base, [x, 2 * base - x])  # cos = -1: 1 + (N - 1) cos = 0
    torch.testing.assert_close(got, base)


def test_passthrough_returns_the_tensor_and_scales():
    _, (x,) = make(1)
    assert run("passthrough", None, [x]) is x
    torch.testing.assert_close(run("passthrough", None, [x], [{"scale": 0.5}]), 0.5 * x)


def test_della_epsilon_rule_raises_config_error():
    base, xs = make(1)
    with pytest.raises(ConfigError, match="epsilon"):
        run("della", base, xs, [{"weight": 1.0, "density": 0.9, "epsilon": 0.15}])
    m = METHODS.get("della")
    mp = [m.fill_model_params({"weight": 1.0, "density": 0.1, "epsilon": 0.2}, "x")]
    with pytest.raises(ConfigError, match="density"):
        m.check_params(mp, m.fill_global_params({}, "x"), "sections[0]")
    run("della", base, xs, [{"weight": 1.0, "density": 1.0, "epsilon": 0.5}])  # density 1: no rule


# ---------------------------------------------------------------- conformance, every method


def valid_inputs(name: str, dtype, shape=(5, 8)) -> tuple[Any, list, list, dict]:
    m = METHODS.get(name)
    n = m.max_models if m.max_models is not None and m.max_models < 3 else max(m.min_models, 3)
    base, xs = make(n, shape=shape, dtype=dtype)
    if name == "slerp":
        xs = [base, xs[1]]
    values = {"weight": 0.4, "density": 0.6, "epsilon": 0.1, "gamma": 0.05, "scale": 1.5}
    mp = [{p.name: values[p.name] for p in m.model_params if p.name in values} for _ in xs]
    gp = {"slerp": {"t": 0.35}, "nearswap": {"t": 0.05}}.get(name, {})
    return (base if m.needs_base else None), xs, mp, gp


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 8), (11,), (2, 3, 4)])
@pytest.mark.parametrize("name", METHODS.names())
def test_conformance_output(name, dtype, shape):
    base, xs, mp, gp = valid_inputs(name, dtype, shape)
    before = [x.clone() for x in xs] + ([base.clone()] if base is not None else [])
    got = run(name, base, xs, mp, gp, seed=0)
    assert got.shape == xs[0].shape and got.dtype == dtype
    assert torch.isfinite(got).all()
    after = xs + ([base] if base is not None else [])
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), (
        "inputs were modified"
    )
    if base is not None:  # resident deltas give the same result as full tensors
        m = METHODS.get(name)
        inp = MergeInput(
            base, None, [m.fill_model_params(p, "t") for p in mp], m.fill_global_params(gp, "t"),
            deltas=[x - base for x in xs], generator=torch.Generator().manual_seed(0), name="t",
        )  # fmt: skip
        torch.testing.assert_close(m.merge(inp), got)


@pytest.mark.parametrize("name", METHODS.names())
def test_conformance_model_count(name):
    m = METHODS.get(name)
    with pytest.raises(ConfigError, match=name):
        m.check_model_count(m.min_models - 1, "sections[0]")
    if m.max_models is not None:
        with pytest.raises(ConfigError, match=r"at most|exactly"):
            m.check_model_count(m.max_models + 1, "sections[0]")
    m.check_model_count(m.min_models, "sections[0]")


@pytest.mark.parametrize(
    "name", [n for n in METHODS if "density" in {p.name for p in METHODS.get(n).params}]
)
@pytest.mark.parametrize("bad", [0, 1.5, -0.1, float("nan"), "half"])
def test_conformance_density_range(name, bad):
    m = METHODS.get(name)
    with pytest.raises(ConfigError, match="density"):
        m.fill_model_params({"weight": 1.0, "density": bad}, "sections[0], model a")


@pytest.mark.parametrize("name", METHODS.names())
def test_conformance_params_declared(name):
    m = METHODS.get(name)
    with pytest.raises(ConfigError, match="no parameter 'wieght'"):
        m.fill_model_params({"wieght": 1.0}, "x")
    for p in m.params:
        assert p.kind in (float, int, bool)
        if p.default is not None:
            assert p.check(p.default, "default") == p.default
    if "weight" in {p.name for p in m.params}:
        with pytest.raises(ConfigError, match="weight"):
            m.fill_model_params({}, "x")
    if m.skips_base_model and not m.needs_base:  # the base, when set, is their origin
        assert name in {"nuslerp", "multislerp"}


def test_registered_names_and_flags():
    assert set(METHODS.names()) == {
        "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
        "breadcrumbs_ties", "della", "della_linear", "slerp", "model_stock", "passthrough",
        "nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl",
    }  # fmt: skip
    assert all(METHODS.get(n).name == n for n in METHODS)  # each lazy entry names its own method
    assert {n for n in METHODS if METHODS.get(n).randomized} == {
        "dare_ties",
        "dare_linear",
        "della",
        "della_linear",
    }
    defaults = {
        n: METHODS.get(n).param("normalize").default
        for n in METHODS
        if "normalize" in {p.name for p in METHODS.get(n).params}
    }
    assert defaults["linear"] and defaults["ties"] and defaults["della"]
    assert not (defaults["task_arithmetic"] or defaults["dare_ties"] or defaults["della_linear"])


# ---------------------------------------------------------------- properties

finite = st.floats(0.05, 5.0)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-3, 3).filter(lambda w: abs(w) > 0.05), min_size=2, max_size=4), finite)
def test_linear_normalized_invariant_to_weight_scale(weights, c):
    if abs(sum(weights)) < 0.1:
        return
    _, xs = make(len(weights))
    a = run("linear", None, xs, [{"weight": w} for w in weights])
    b = run("linear", None, xs, [{"weight": w * c} for w in weights])
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.lists(finite, min_size=2, max_size=4), finite, st.floats(0.1, 1.0))
def test_ties_normalized_invariant_to_positive_weight_scale(weights, c, density):
    base, xs = make(len(weights), seed=2)
    mp = [{"weight": w, "density": density} for w in weights]
    a = run("ties", base, xs, mp)
    b = run("ties", base, xs, [dict(p, weight=p["weight"] * c) for p in mp])
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(st.floats(-2, 2), st.sampled_from(["task_arithmetic", "ties", "breadcrumbs"]))
def test_delta_methods_linear_in_lambda(lam, name):
    base, xs = make(2, seed=5)
    mp = [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.7}]
    one = run(name, base, xs, mp, {"lambda": 1.0})
    got = run(name, base, xs, mp, {"lambda": lam})
    torch.testing.assert_close(got - base, lam * (one - base), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- mergekit's own kernels

DIFF_CASES = [
    ("linear", {"weight": [0.5, 0.3, 0.2]}, {}),
    ("linear", {"weight": [0.5, -0.3, 1.2]}, {"normalize": False}),
    ("task_arithmetic", {"weight": [0.5, 0.3, 0.2]}, {"lambda": 0.7}),
    ("ties", {"weight": [0.5, 0.3, -0.2], "density": [0.5, 0.7, 0.3]}, {}),
    ("ties", {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.7, 0.3]}, {"rescale": True, "lambda": 1.3}),
    ("breadcrumbs", {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.7, 0.3], "gamma": [0.1, 0.01, 0.2]}, {}),
    ("breadcrumbs_ties", {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.7, 0.3], "gamma": [0.1, 0.0, 0.2]}, {"normalize": True}),
    ("model_stock", {}, {}),
    ("model_stock", {}, {"filter_wise": True}),
    ("slerp", {}, {"t": 0.3}),
    ("passthrough", {"scale": [0.5]}, {}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "per_model", "gp"), DIFF_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_mergekit_kernels(name, per_model, gp, dtype):
    api = pytest.importorskip("mergekit.merge_methods.api")
    m = METHODS.get(name)
    n = {"slerp": 1, "passthrough": 1}.get(name, 3)
    base, xs = make(n, shape=(8, 16), dtype=dtype, seed=11)
    mp = [{k: v[i] for k, v in per_model.items()} for i in range(n)]
    if name == "slerp":
        got = run(name, base, [base, xs[0]], [{}, {}], gp)
    else:
        got = run(name, base if m.needs_base else None, xs, mp, gp)
    inputs = [base, *xs] if m.needs_base else xs
    want = api.merge_tensors(
        inputs, name, parameters={**gp, **per_model}, base_index=0 if m.needs_base else None
    )
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want.to(dtype), rtol=tol, atol=tol)


# (name, models, base given, per-model lists, global parameters): the methods added for mergekit
# parity; nuslerp and multislerp run with and without a base (it is optional for them).
PARITY_CASES = [
    ("nuslerp", 2, False, {"weight": [0.3, 0.9]}, {}),
    ("nuslerp", 2, True, {"weight": [0.3, 0.9]}, {"nuslerp_flatten": False}),
    ("nuslerp", 2, False, {"weight": [0.5, -0.2]}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("multislerp", 3, False, {"weight": [0.3, 0.9, 0.2]}, {}),
    ("multislerp", 4, True, {"weight": [0.3, 0.9, -0.2, 0.5]}, {"normalize_weights": False}),
    ("karcher", 3, False, {}, {}),
    ("karcher", 4, False, {}, {"max_iter": 3, "tol": 1e-7}),
    ("sce", 3, True, {}, {}),
    ("sce", 3, True, {}, {"select_topk": 0.3}),
    ("nearswap", 1, True, {}, {"t": 0.05}),
    ("arcee_fusion", 1, True, {}, {}),
    ("ram", 3, True, {}, {"epsilon": 0.08}),
    ("ramplus_tl", 3, True, {}, {"epsilon": 0.08, "r": 0.5, "alpha": 0.4}),
    ("ramplus_tl", 3, True, {}, {}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "n", "with_base", "per_model", "gp"), PARITY_CASES)
@pytest.mark.parametrize("shape", [(8, 16), (17,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_methods_match_mergekit_kernels(name, n, with_base, per_model, gp, shape, dtype):
    api = pytest.importorskip("mergekit.merge_methods.api")
    base, xs = make(n, shape=shape, dtype=dtype, seed=11)
    mp = [{k: v[i] for k, v in per_model.items()} for i in range(n)]
    got = run(name, base if with_base else None, xs, mp, gp)
    want = api.merge_tensors(
        [base, *xs] if with_base else xs,
        name,
        parameters={**gp, **per_model},
        base_index=0 if with_base else None,
    )
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want.to(dtype), rtol=tol, atol=tol)

"""The fused weighted-sum kernel against float64 references, and against each method's own
pure function (the engine runs the kernel for weighted-sum methods instead of `merge`)."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge import run_task
from evomerge.methods import METHODS
from evomerge.plan import OutTensor, TensorTask
from evomerge.weighted_sum import weighted_sum_into

BF16, F32, F64 = torch.bfloat16, torch.float32, torch.float64


def sources(n: int, dtype: torch.dtype, size: int = 1000, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=g, dtype=F64).to(dtype) for _ in range(n)]


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of x's dtype at x (for a tolerance of one rounding)."""
    eps = torch.finfo(x.dtype).eps
    return x.double().abs().clamp(min=torch.finfo(x.dtype).tiny) * eps


@pytest.mark.parametrize(
    "coefficients",
    [[0.7], [1.0], [0.25, 0.75], [0.5, 0.5], [0.6, 0.3], [1.5, -0.3, -0.2], [0.2, 0.3, 0.1, 0.4]],
)
@pytest.mark.parametrize(
    ("src_dtype", "out_dtype"), [(BF16, BF16), (F32, F32), (BF16, F32), (F32, BF16)]
)
@pytest.mark.parametrize("chunk", [7, 128, None])
def test_weighted_sum_is_float32_sum_rounded_once(coefficients, src_dtype, out_dtype, chunk):
    xs = sources(len(coefficients), src_dtype)
    out = torch.empty(1000, dtype=out_dtype)
    weighted_sum_into(out, xs, coefficients, chunk=chunk)
    want = sum(c * x.double() for c, x in zip(coefficients, xs, strict=True))
    # float32 arithmetic (error ~ terms * eps32 * sum |c x|) plus one rounding into out's dtype
    slack = (
        len(xs)
        * 2**-23
        * sum(abs(c) * x.double().abs() for c, x in zip(coefficients, xs, strict=True))
    )
    assert torch.all((out.double() - want).abs() <= ulp(out) + slack + 1e-30)


def test_weighted_sum_two_model_soup_is_exact_in_float32():
    """The lerp path: bit-equal to computing the interpolation in float32 and rounding once."""
    x0, x1 = sources(2, BF16, size=5000)
    out = torch.empty_like(x0)
    weighted_sum_into(out, [x0, x1], [0.3, 0.7], chunk=64)
    assert torch.equal(out, torch.lerp(x0.float(), x1.float(), 0.7).to(BF16))


def test_weighted_sum_into_a_strided_target():
    x0, x1 = (x.view(20, 50) for x in sources(2, F32))
    target = torch.zeros(50, 20).t()  # not contiguous
    weighted_sum_into(target, [x0, x1], [2.0, -1.0])
    torch.testing.assert_close(target, 2 * x0 - x1)


def _task(name: str, mp: list[dict], gp: dict, with_base: bool) -> TensorTask:
    m = METHODS.get(name)
    models = tuple(f"m{i}" for i in range(len(mp)))
    sources = {k: "w" for k in (*models, "base")}
    return TensorTask(
        out=OutTensor("w", None, (6, 9), sources),
        method=m,
        base="base" if with_base else None,
        models=models,
        model_params=tuple(m.fill_model_params(p, "t") for p in mp),
        global_params=m.fill_global_params(gp, "t"),
        seed=0,
    )


CASES = [
    ("linear", [{"weight": 0.6}, {"weight": 0.3}, {"weight": -0.25}], {}),
    ("linear", [{"weight": 0.6}, {"weight": 0.3}], {"normalize": False}),
    ("task_arithmetic", [{"weight": 0.6}, {"weight": 0.3}, {"weight": -0.25}], {"lambda": 0.7}),
    ("task_arithmetic", [{"weight": 0.6}, {"weight": 0.3}], {"normalize": True}),
    ("passthrough", [{"scale": 0.5}], {}),
    ("passthrough", [{}], {}),
]


@pytest.mark.parametrize(("name", "mp", "gp"), CASES)
def test_engine_weighted_sum_equals_the_method_function(name, mp, gp):
    """Every method that declares coefficients: the engine's kernel gives the method's numbers."""
    from evomerge.methods.base import MergeInput

    assert {n for n, _, _ in CASES} == {n for n in METHODS if METHODS.get(n).coefficients}
    task = _task(name, mp, gp, with_base=METHODS.get(name).needs_base)
    g = torch.Generator().manual_seed(1)
    tensors = {k: torch.randn(6, 9, generator=g, dtype=F64) for k in ("base", *task.models)}
    got = run_task(task, lambda model, _n: tensors[model], compute_dtype=F64)
    base = tensors["base"] if task.base else None
    inp = MergeInput(base, [tensors[m] for m in task.models], task.model_params, task.global_params)
    torch.testing.assert_close(got, task.method.merge(inp), rtol=1e-12, atol=1e-12)

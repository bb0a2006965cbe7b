"""out = sum_j c_j x_j over source tensors of any float dtype, computed in float32, no temporaries.

Linear, task arithmetic and passthrough are weighted sums of the source tensors (with the base as
one source for task arithmetic), so one kernel serves them in both the disk merge and the
in-memory candidate merge. Why it exists: per-chunk temporaries (`x.float() * w`) made the
in-memory merge allocation-bound (a fresh 1 MiB block per op is a fresh mmap with page faults on
every chunk), and separate convert / scale / add / cast passes each cross memory. Here:

- two sources whose coefficients sum to 1 are one `torch.lerp` (computed in float32 even for
  bf16 inputs, rounded once): the soup of two models at copy bandwidth;
- otherwise one float32 scratch chunk is reused: the first source is converted and scaled into
  it by one mixed-dtype add to zeros, the middle ones are added with mixed-dtype `add_` (float32
  arithmetic, bit-equal to converting first), and the last add writes straight into the output,
  rounded once: one pass per source.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

CPU_CHUNK = 1 << 19  # 2 MiB of float32 scratch: the fastest of 2^16..2^20 on 2 cores
DEVICE_CHUNK = 1 << 26  # on GPUs chunks only bound the scratch memory (256 MiB)
_LERP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # lerp's opmath is float32


def weighted_sum_into(
    out: Tensor,
    sources: Sequence[Tensor],
    coefficients: Sequence[float],
    *,
    compute_dtype: torch.dtype = torch.float32,
    chunk: int | None = None,
) -> Tensor:
    """Write sum_j c_j x_j into `out` (every source the shape of `out`) and return `out`."""
    terms = [(float(c), x.reshape(-1)) for c, x in zip(coefficients, sources, strict=True)]
    flat_out = out.view(-1) if out.is_contiguous() else None
    if flat_out is None:  # a strided target (rare): compute contiguously, then copy
        tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        weighted_sum_into(tmp, sources, coefficients, compute_dtype=compute_dtype, chunk=chunk)
        return out.copy_(tmp)
    n = flat_out.numel()
    step = chunk or (CPU_CHUNK if out.device.type == "cpu" else DEVICE_CHUNK)
    if _lerp_applies(terms, out, compute_dtype):
        (_, x0), (c1, x1) = terms
        for a in range(0, n, step):
            torch.lerp(x0[a : a + step], x1[a : a + step], c1, out=flat_out[a : a + step])
        return out
    if not terms:
        return out.zero_()
    m = min(step, n)
    scratch = torch.empty(m, dtype=compute_dtype, device=out.device)
    zeros = torch.zeros(m, dtype=compute_dtype, device=out.device)
    for a in range(0, n, step):
        b = min(a + step, n)
        chunk_terms = [(c, x[a:b]) for c, x in terms]
        _sum_chunk(flat_out[a:b], chunk_terms, scratch[: b - a], zeros[: b - a])
    return out


def _sum_chunk(out: Tensor, terms: list[tuple[float, Tensor]], acc: Tensor, zeros: Tensor) -> None:
    """One op per source: `0 + c x` converts and scales at once (exactly c x), mixed-dtype adds
    accumulate in the compute dtype, the last add rounds once into `out`."""
    (c0, x0), rest = terms[0], terms[1:]
    if not rest:
        if c0 == 1.0:
            out.copy_(x0)
        else:
            torch.add(zeros, x0, alpha=c0, out=out)
        return
    torch.add(zeros, x0, alpha=c0, out=acc)
    for c, x in rest[:-1]:
        acc.add_(x, alpha=c)
    c_last, x_last = rest[-1]
    torch.add(acc, x_last, alpha=c_last, out=out)


def _lerp_applies(terms: list[tuple[float, Tensor]], out: Tensor, compute: torch.dtype) -> bool:
    """Two sources, coefficients summing to 1, one dtype lerp computes in float32."""
    if len(terms) != 2 or compute != torch.float32 or out.dtype not in _LERP_DTYPES:
        return False
    (c0, x0), (c1, x1) = terms
    return abs(c0 + c1 - 1.0) < 1e-12 and x0.dtype == x1.dtype == out.dtype

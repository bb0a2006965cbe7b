"""The memory plan: the bytes each worker needs on each device and on its host, computed before
any worker starts, from the checkpoints' safetensors headers and the memory this machine has.

Per worker (P: elements of the reference model; b: bytes per element of the study `dtype`;
s: bytes of all held models (sources and base) in their file dtypes; M: how many models are held;
n: elements of the largest tensor a task merges (a layer's experts stacked, evomerge.fusion), n_m
the bytes of the largest file tensor in model m's file; k: GPUs of the worker):

- live: the live model, P x b, split by layer over the k GPUs (P x b / k each)
- sources, by tier: `device` s on the device(s) (s / k each); `host` s on the host; `disk`
  nothing (the page cache, which the kernel can take back, holds the files)
- load: copying sources out of their files into host memory holds one model file's bytes more
  (max s_m) at a time, and glibc keeps it (evomerge.memory); CPU device tier and host tier
- buffer: the host and disk tiers stream each task's sources through 2 x sum_m n_m of staging
  slabs on each device; a CPU disk worker merges from the mapped pages themselves, sum_m n_m
  (2 x that for a method that casts them whole, as safetensors also copies what it maps)
- merge: float32 temporaries of one tensor, (2M + 2) x n x 4, for a method outside the fused
  weighted sum (TIES, DARE, SLERP, ...: the inputs cast to float32, their task vectors, the
  method's own; measured 9 to 13 x n x 4 for TIES with M = 4, as glibc happens to place the
  blocks, about 10 in the median); the fused sum needs one scratch chunk
  (`weighted_sum.CPU_CHUNK`, `DEVICE_CHUNK`)
- eval: the KV cache 2 x layers x kv_heads x head_dim x B x T x b for batch B and longest
  request T (split by layer over the k GPUs), activations B x T x (2 x V x b + 4 x H x b +
  2 x I x b) (the logits and lm-eval's log-softmax of them in the model's dtype; the residual
  stream, attention and MLP intermediates of the one layer that runs: SDPA attention, no T x T
  term), and 16 MiB of kernels a first forward loads. T is the model's context
  (`max_position_embeddings`), at most 2048 tokens.
- total: live + sources + load + buffer + max(merge, eval): the evaluation reuses the freed
  temporaries of a large merge (measured: TIES' merge peak is the worker's peak); with only
  fused methods the two add up.
- on the host of a GPU worker: the live model once while it loads (built on the host, then
  moved), the host tier's sources and the load. A CPU worker's device is its host: one row.

Measured on a CPU worker (tests/test_memory_plan.py: a 20M-parameter Llama, 3 sources and a
base, bf16, batch 2 x 256 tokens; the median of 3 runs, as single runs of TIES vary by up to
+-10%), plan against peak RSS: device +3% (linear) and -5% (TIES), host -1%, disk +1% (TIES);
disk with a fused method is over-estimated by 20% (its mapped pages are gone before the
evaluation starts).

`auto` takes the first tier that fits: device, else host, else disk. When none fits, the plan
says what would (fewer sources, the host tier, k GPUs per worker, a smaller batch, bfloat16),
with the numbers. `EVOMERGE_MEMORY_CAPACITY` (e.g. `host=64GiB,cuda=80GiB,gpus=8`) replaces the
capacities read from the machine, to plan for another machine or to test the refusal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError, ResourceError
from evomerge.memory_measure import PLAN_FILE, Capacity, gb

TIERS = ("device", "host", "disk")
MAX_REQUEST = 2048  # tokens: lm-eval's default context, and what most tasks stay under
RUNTIME = 16 * 2**20  # kernels' code and buffers a first forward pass loads (measured: 13 MB)
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class Footprint:
    """What the headers and config.json say about the models (no tensor data read)."""

    params: int  # elements of the reference model
    model_bytes: dict[str, int]  # model name -> bytes in its file dtype
    largest: int  # elements of the largest tensor
    largest_bytes: int  # bytes of the largest tensor, summed over the models' file dtypes
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    context: int

    @classmethod
    def of(cls, readers: Mapping[str, Any], reference: str) -> Footprint:
        from evomerge.fusion import largest_fused
        from evomerge.safetensors_stream import DTYPE_BITS

        def numel(shape: tuple[int, ...]) -> int:
            n = 1
            for d in shape:
                n *= d
            return n

        sizes = {
            name: {t: numel(i.shape) * DTYPE_BITS.get(i.dtype, 32) // 8 for t, i in r.infos.items()}
            for name, r in readers.items()
        }
        ref = readers[reference]
        big = max(ref.infos.values(), key=lambda i: numel(i.shape))
        cfg = ref.config
        cfg = {**cfg, **cfg.get("text_config", {})}  # multimodal configs nest the LM's fields
        hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
        heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1)
        return cls(
            params=sum(numel(i.shape) for i in ref.infos.values()),
            model_bytes={name: sum(s.values()) for name, s in sizes.items()},
            # a layer's experts merge as one stacked tensor (evomerge.fusion)
            largest=max(numel(big.shape), largest_fused(ref.config)),
            largest_bytes=sum(s.get(big.name, 0) for s in sizes.values()),
            layers=int(ref.num_layers),
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or (hidden // heads if hidden else 0)),
            hidden=hidden,
            intermediate=int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden),
            vocab=int(cfg.get("vocab_size") or 0),
            context=int(
                cfg.get("max_position_embeddings") or cfg.get("n_positions") or MAX_REQUEST
            ),
        )


@dataclass(frozen=True)
class Row:
    """One device (or the host) of one worker: what it holds, in bytes."""

    device: str
    live: int = 0
    sources: int = 0
    load: int = 0  # a model file read into process memory while the sources load
    buffer: int = 0
    workspace: int = 0
    headroom: int = 0
    capacity: int = 0
    shared_by: int = 1  # workers on this host (the host row only)
    reuse: bool = True  # the evaluation reuses the merge's freed temporaries (large ones)

    @property
    def total(self) -> int:
        merge_eval = (
            max(self.workspace, self.headroom) if self.reuse else self.workspace + self.headroom
        )
        return self.shared_by * (self.live + self.sources + self.load + self.buffer + merge_eval)

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


@dataclass(frozen=True)
class PlanInputs:
    """The few numbers of a study the plan depends on."""

    dtype: str = "float32"
    cuda: bool = False
    workers: int = 1
    gpus_per_worker: int = 1
    batch_size: int = 16
    fused_only: bool = False  # every method of the space is a fused weighted sum
    longest: int | None = None  # tokens; default min(context, MAX_REQUEST)
    remote: bool = False  # workers on a Ray cluster this machine cannot see: planned, not enforced


def rows(fp: Footprint, st: PlanInputs, tier: str, cap: Capacity) -> list[Row]:
    """Each device of one worker, then its host (the same row on CPU), for `tier`."""
    from evomerge.weighted_sum import CPU_CHUNK, DEVICE_CHUNK

    b = _DTYPE_BYTES.get(st.dtype, 4)
    k = st.gpus_per_worker if st.cuda else 1
    held = sum(fp.model_bytes.values())
    live = fp.params * b
    if tier == "device":
        buffer = 0
    elif tier == "disk" and not st.cuda:  # merged from the mapped pages, no staging slabs
        buffer = fp.largest_bytes * (1 if st.fused_only else 2)
    else:
        buffer = 2 * fp.largest_bytes
    chunk = DEVICE_CHUNK if st.cuda else CPU_CHUNK
    workspace = 4 * (
        min(fp.largest, chunk) if st.fused_only else (2 * len(fp.model_bytes) + 2) * fp.largest
    )
    t = st.longest or min(fp.context, MAX_REQUEST)
    kv = 2 * fp.layers * fp.kv_heads * fp.head_dim * st.batch_size * t * b
    act = st.batch_size * t * (2 * fp.vocab * b + 4 * fp.hidden * b + 2 * fp.intermediate * b)
    on_device = held if tier == "device" else 0
    on_host = held if tier == "host" else 0
    # copying sources out of their files into this process holds one file's worth at a time
    load = max(fp.model_bytes.values()) if on_host or (on_device and not st.cuda) else 0
    reuse = not st.fused_only
    if not st.cuda:
        return [
            Row(
                "cpu",
                live,
                on_device + on_host,
                load,
                buffer,
                workspace,
                kv + act + RUNTIME,
                cap.host,
                shared_by=st.workers,
                reuse=reuse,
            )
        ]
    gpus = [
        Row(
            f"cuda:{i}",
            live // k,
            on_device // k,
            0,
            buffer,
            workspace,
            kv // k + act + RUNTIME,
            cap.gpus[i] if i < len(cap.gpus) else 0,
            reuse=reuse,
        )
        for i in range(k)
    ]
    host = Row(
        "host",
        live,
        on_host,
        load,
        capacity=cap.host,
        shared_by=min(st.workers, _slots(st, cap)),
    )
    return [*gpus, host]


def _slots(st: PlanInputs, cap: Capacity) -> int:
    """Workers that run on this machine at once: one per k GPUs it has (at least one)."""
    return max(1, len(cap.gpus) // max(1, st.gpus_per_worker))


@dataclass(frozen=True)
class MemoryPlan:
    requested: str  # the residency asked for: auto or a tier
    tier: str  # the tier the workers use
    reason: str  # why this tier (auto), or what does not fit
    rows: tuple[Row, ...]  # one worker's devices, then its host
    study: PlanInputs
    capacity_source: str
    fits: bool
    fix: str = ""  # what would fit, when nothing does
    per_tier: dict[str, bool] = field(default_factory=dict)
    tokens: int = 0  # the longest request the headroom is sized for

    def check(self) -> None:
        """Refuse, in one line with the numbers, a study that cannot fit (exit 2)."""
        if self.fits:
            return
        worst = max(self.rows, key=lambda r: r.total - r.capacity)
        has = f"has {gb(worst.capacity)}" if worst.capacity else "does not exist"
        raise ResourceError(
            f"memory plan: residency {self.tier} needs {gb(worst.total)} on {worst.device}, which "
            f"{has} ({self.capacity_source}); {self.fix}"
        )

    def to_json(self) -> str:
        data = asdict(self)
        data["rows"] = [{**asdict(r), "total": r.total, "fits": r.fits} for r in self.rows]
        return json.dumps(data, indent=2, sort_keys=True)

    def write(self, run_dir: Path) -> Path:
        from evomerge.atomic import atomic_write

        path = Path(run_dir) / PLAN_FILE
        atomic_write(path, self.to_json() + "\n")
        return path

    def table(self) -> Any:
        """One short rich table: a row per device of one worker, then the host."""
        from rich.table import Table

        st = self.study
        table = Table(
            title=f"memory plan: residency {self.tier} ({self.reason})",
            caption=f"per worker ({st.workers} worker(s), {st.gpus_per_worker if st.cuda else 1} "
            f"device(s) each); eval: KV cache and activations for batch {st.batch_size} x "
            f"{self.tokens} tokens",
            title_justify="left",
            caption_justify="left",
        )
        for col in ("device", "live", "sources", "load", "buffer", "merge", "eval", "total"):
            table.add_column(col, justify="left" if col == "device" else "right")
        table.add_column(f"free ({self.capacity_source})", justify="right")
        for r in self.rows:
            shared = f" x{r.shared_by}" if r.shared_by > 1 else ""
            table.add_row(
                r.device + shared,
                *(
                    gb(v)
                    for v in (r.live, r.sources, r.load, r.buffer, r.workspace, r.headroom, r.total)
                ),
                ("" if r.fits else "[red]") + gb(r.capacity),
            )
        return table

    def print(self, file: Any = None) -> None:
        from rich.console import Console

        Console(file=file, width=120).print(self.table())


def plan_memory(
    fp: Footprint, st: PlanInputs, requested: str = "auto", cap: Capacity | None = None
) -> MemoryPlan:
    """The tier to use and its bytes per device; `auto` takes the first tier that fits."""
    if requested != "auto" and requested not in TIERS:
        raise ConfigError(f"executor.residency: {requested!r} (use auto, {', '.join(TIERS)})")
    cap = cap or Capacity.detect(st.cuda)
    if st.cuda and not cap.gpus:  # a controller without GPUs: its workers run elsewhere
        st = replace(st, remote=True)
    per_tier = {t: all(r.fits for r in rows(fp, st, t, cap)) for t in TIERS}
    if requested == "auto":
        tier = next((t for t in TIERS if per_tier[t]), "disk")
        if per_tier[tier]:
            reason = "auto: " + (
                "the sources fit on the device"
                if tier == "device"
                else f"the sources do not fit on the device, {tier} fits"
            )
        else:
            reason = "auto: no tier fits"
    else:
        tier, reason = requested, "as asked"
    plan_rows = tuple(rows(fp, st, tier, cap))
    fits = per_tier[tier]
    if st.remote:
        reason += "; the cluster's nodes are not visible from here, so the plan is not enforced"
        fits = True
    return MemoryPlan(
        requested=requested,
        tier=tier,
        reason=reason,
        rows=plan_rows,
        study=st,
        capacity_source=cap.source,
        fits=fits,
        fix="" if fits else what_fits(fp, st, tier, cap, per_tier),
        per_tier=per_tier,
        tokens=st.longest or min(fp.context, MAX_REQUEST),
    )


def what_fits(
    fp: Footprint, st: PlanInputs, tier: str, cap: Capacity, per_tier: Mapping[str, bool]
) -> str:
    """The changes that would make the study fit, each with the number it needs."""

    def ok(fp2: Footprint, st2: PlanInputs, t: str) -> bool:
        if st2.cuda and len(cap.gpus) < st2.gpus_per_worker:
            return False
        return all(r.fits for r in rows(fp2, st2, t, cap))

    ideas: list[str] = []
    better = [t for t in TIERS if per_tier[t] and t != tier]
    if better:
        ideas.append(f"executor.residency: {better[0]}")
    names = list(fp.model_bytes)
    for keep in range(len(names) - 1, 1, -1):  # a base and one source is the least that merges
        fewer = replace(fp, model_bytes={n: fp.model_bytes[n] for n in names[:keep]})
        if ok(fewer, st, tier):
            ideas.append(f"{keep - 1} models.sources (now {len(names) - 1}, with the base)")
            break
    if st.cuda:
        for k in [*range(st.gpus_per_worker + 1, len(cap.gpus) + 1), len(cap.gpus)]:
            if ok(fp, replace(st, gpus_per_worker=k), tier):
                ideas.append(f"executor.gpus_per_worker: {k}")
                break
    for batch in (st.batch_size // 2**i for i in range(1, 12)):
        if batch >= 1 and ok(fp, replace(st, batch_size=batch), tier):
            ideas.append(f"tasks.batch_size: {batch}")
            break
    if st.dtype == "float32" and ok(fp, replace(st, dtype="bfloat16"), tier):
        ideas.append("dtype: bfloat16")
    if st.workers > 1 and not st.cuda and ok(fp, replace(st, workers=1), tier):
        ideas.append("executor.workers: 1")
    if not ideas:
        return "nothing fits on this machine: use a machine with more memory"
    return "it would fit with " + ", or ".join(ideas)


def inputs_of(config: Any, methods: Any = ()) -> PlanInputs:
    """The plan's inputs from a StudyConfig; `methods`: the merge methods the space may use."""
    from evomerge.methods import METHODS
    from evomerge.worker import resolve_device

    opts = config.executor.options
    gpus = opts.get("gpus_per_worker")
    return PlanInputs(
        dtype=config.dtype,
        cuda=resolve_device(config.device).startswith("cuda"),
        workers=config.executor.workers,
        gpus_per_worker=max(1, int(gpus)) if gpus else 1,
        batch_size=config.tasks.batch_size,
        fused_only=bool(methods) and all(METHODS.get(m).coefficients is not None for m in methods),
        remote=bool(opts.get("ray_address") or os.environ.get("RAY_ADDRESS")),
    )


def plan_for_study(
    config: Any, readers: Mapping[str, Any], reference: str, methods: Any = ()
) -> MemoryPlan:
    """The plan of a StudyConfig (never raises for a study that does not fit: `check()` does,
    where a run starts, so reports and exports of a finished run still build on a small host)."""
    requested = str(config.executor.residency)
    return plan_memory(Footprint.of(readers, reference), inputs_of(config, methods), requested)

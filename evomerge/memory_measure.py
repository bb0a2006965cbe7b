"""What this machine has and what a worker used: the capacities the memory plan
(evomerge.memory_plan) is checked against, and, measured, not only predicted, the peak memory a
worker reached with its first candidate, which `evomerge status` shows beside the plan.

Capacities: /proc/meminfo's MemAvailable for the host and torch.cuda.mem_get_info per visible
GPU, or `EVOMERGE_MEMORY_CAPACITY` (`host=SIZE,cuda=SIZE,gpus=N`, sizes like 80GiB, 24GB, 512M)
to plan for another machine or to test a refusal.

On CUDA the peak is torch's `max_memory_allocated` per device (the caching allocator's own
reserve and the CUDA context are not counted; neither does the plan). On the host it is the
peak RSS (VmHWM) less the RSS when the worker started: the interpreter, torch and lm-eval are
the same for every study, and the plan counts what the study adds.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError

CAPACITY_ENV = "EVOMERGE_MEMORY_CAPACITY"
PLAN_FILE = "memory_plan.json"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def gb(n: float) -> str:
    """Bytes for people: '70.10 GB', '212.3 MB', '4.1 kB'."""
    for unit, scale, digits in (("GB", 1e9, 2), ("MB", 1e6, 1), ("kB", 1e3, 1)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{n:.0f} B"


def parse_size(text: str, where: str = CAPACITY_ENV) -> int:
    """'80GiB' -> 85899345920, '24GB' -> 24e9, '512M' -> 512 MiB, '1000' -> 1000 bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ConfigError(f"{where}: {text!r} is no size (write e.g. 80GiB, 24GB, 512M)")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class Capacity:
    """Bytes free on each visible GPU and available on the host, and where they came from."""

    host: int
    gpus: tuple[int, ...] = ()
    source: str = "this machine"

    @classmethod
    def detect(cls, want_gpus: bool) -> Capacity:
        """/proc/meminfo's MemAvailable, torch.cuda.mem_get_info per GPU (only when the study
        uses CUDA: it starts a CUDA context); `EVOMERGE_MEMORY_CAPACITY` overrides each."""
        override = _parse_override(os.environ.get(CAPACITY_ENV, ""))
        host = override.get("host") or _host_available()
        if "cuda" in override:
            gpus = (override["cuda"],) * override.get("gpus", 1)
        elif want_gpus:
            gpus = _gpus_free()
        else:
            gpus = ()
        return cls(host, gpus, f"{CAPACITY_ENV}" if override else "this machine")


def _parse_override(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        key = key.strip().lower()
        if key not in ("host", "cuda", "gpus") or not value:
            raise ConfigError(
                f"{CAPACITY_ENV}: {part!r} is not host=SIZE, cuda=SIZE (per GPU) or gpus=N"
            )
        out[key] = int(value) if key == "gpus" else parse_size(value)
    return out


def _host_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil

    return int(psutil.virtual_memory().available)


def _gpus_free() -> tuple[int, ...]:
    import torch

    if not torch.cuda.is_available():
        return ()
    return tuple(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))


def rss_bytes(field_name: str = "VmRSS") -> int:
    """The process's resident set (VmRSS) or its peak (VmHWM), from /proc/self/status; on other
    systems the peak from getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_memory(devices: Any, host_base: int) -> dict[str, int]:
    """What a worker measured: per CUDA device torch's peak allocation (max_memory_allocated),
    and on the host its peak RSS (VmHWM) less the RSS before it loaded anything (`host_base`:
    torch and lm-eval's own code, which the plan does not count)."""
    import torch

    out: dict[str, int] = {}
    for d in sorted({str(torch.device(x)) for x in devices}):
        dev = torch.device(d)
        if dev.type == "cuda":
            out[str(dev) if dev.index is not None else "cuda:0"] = int(
                torch.cuda.max_memory_allocated(dev)
            )
    key = "host" if out else "cpu"
    out[key] = max(0, rss_bytes("VmHWM") - host_base)
    return out


def plan_vs_measured(run_dir: str | Path, records: Any) -> dict[str, Any] | None:
    """The planned total per device (memory_plan.json) beside what each worker measured after its
    first candidate (the `memory` of its first trial line); None for a run without a plan."""
    path = Path(run_dir) / PLAN_FILE
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    measured: dict[str, dict[str, int]] = {}
    for r in records:
        mem = getattr(r, "memory", None)
        if mem and r.worker not in measured:
            measured[r.worker] = dict(mem)
    return {
        "tier": plan.get("tier"),
        "planned": {r["device"]: r["total"] // max(1, r["shared_by"]) for r in plan["rows"]},
        "measured": measured,
    }


def describe_plan_vs_measured(info: Mapping[str, Any]) -> str:
    """One line for `evomerge status`: planned and measured bytes per device (per worker)."""
    planned = ", ".join(f"{d} {gb(v)}" for d, v in info["planned"].items())
    line = f"memory ({info['tier']} tier), planned per worker: {planned}"
    for worker, mem in info["measured"].items():
        line += f"; measured by {worker}: " + ", ".join(f"{d} {gb(v)}" for d, v in mem.items())
    if not info["measured"]:
        line += "; not measured yet"
    return line


def reset_peak() -> int:
    """Start the peak measurements afresh (VmHWM back to the current RSS: /proc/self/clear_refs
    5; CUDA's peak allocation); returns the current RSS, the base the peak is measured from."""
    import contextlib

    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
    return rss_bytes()

"""Where a worker keeps its source weights between candidates: `executor.residency`.

- `device`: every source tensor resident on the worker's device, as stored (the fastest merge;
  (M + 1) x P x bytes-per-weight of device memory beside the live model).
- `host`: sources in host memory (pinned when the device is a GPU) and streamed to the device
  task by task as each candidate is materialized, the copy of the next tensors overlapping the
  merge of the current ones (`stores.Stager`). Device memory: the live model plus two staging
  slabs of the largest tensor's M + 1 sources.
- `disk`: sources memory-mapped from their safetensors files, mapped per tensor and unmapped
  after it; nothing is resident but the page cache.

Every tier hands the merge the same tensors (same dtype, values and shapes), so a candidate gives
bit-identical weights and metrics whichever tier holds its sources. This module is import-light
(no torch): the config and the CLI name the tiers; `stores` builds them.
"""

from __future__ import annotations

from typing import Literal, cast

from evomerge.errors import ConfigError

Residency = Literal["auto", "device", "host", "disk"]  # what a study asks for
Tier = Literal["device", "host", "disk"]  # what a worker runs with (auto resolved)
TIERS: tuple[Tier, ...] = ("device", "host", "disk")


def resolve_residency(requested: str) -> Tier:
    """The tier a worker uses for `executor.residency: requested`.

    `auto` is `device` (every source resident, as before tiers existed) until the memory plan
    chooses from the bytes each tier needs on the devices and hosts it sees; an explicit tier is
    kept as asked."""
    if requested == "auto":
        return "device"
    if requested not in TIERS:
        raise ConfigError(
            f"executor.residency: unknown tier {requested!r} (use auto, {', '.join(TIERS)})"
        )
    return cast(Tier, requested)

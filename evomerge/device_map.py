"""A worker that spans several devices: the live model split by layer with accelerate.

`executor.gpus_per_worker: k` gives a worker k GPUs; the live model is cut into k runs of whole
blocks of about equal bytes (accelerate's `infer_auto_device_map`, given each device's share of
the bytes; it never splits a block, `_no_split_modules`), dispatched with `dispatch_model` so each block runs
on its device and its hooks move the activations between devices. Each source tensor is then
kept on (or streamed to) the device of the parameter it merges into (`tensor_devices`), and the
in-place merge writes every tensor where its parameter lives: no tensor crosses a device per
candidate.

The map is computed over k numbered slots and the slots are then named: `cuda:0 .. cuda:k-1`
normally, or any list of devices, such as `("cuda:0", "cpu")` (a two-device worker on a machine
with one GPU) or `("cpu", "cpu")` (the same per-layer placement, all on the CPU, for tests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from evomerge.quiet import quiet_logger


def _quiet_accelerate() -> AbstractContextManager[None]:
    """accelerate warns 'Device 1 is not available' for slots that are names, not GPUs here."""
    return quiet_logger("accelerate.utils.modeling")


def layer_device_map(
    model: torch.nn.Module, devices: Sequence[str], dtype: torch.dtype | None = None
) -> dict[str, str]:
    """Module name -> device: whole blocks in order, about equal bytes per device. `model` may be
    on the meta device (only shapes are read)."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes
    from accelerate.utils.modeling import get_max_layer_size

    if not devices:
        raise ValueError("a device map needs at least one device")
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    sizes = compute_module_sizes(model, dtype=dtype)
    total, k = sizes[""], len(devices)
    # each slot but the last takes its share of the bytes: accelerate fills the slots in order
    # with whole blocks, and a block that would overflow a slot starts the next one. On the
    # first slot it also keeps room for the largest layer (for offloaded weights, of which a
    # worker has none): that room is given back to the share.
    top = [*model.named_parameters(recurse=False), *model.named_children()]
    reserve, _ = get_max_layer_size(top, sizes, no_split)
    budget: dict[int | str, int] = {i: -(-total // k) for i in range(k - 1)}
    budget[k - 1] = 2 * total + 2**20
    if k > 1:
        budget[0] += reserve
    with _quiet_accelerate():
        by_slot = infer_auto_device_map(
            model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype
        )
    return {name: str(torch.device(devices[int(slot)])) for name, slot in by_slot.items()}


def tensor_devices(names: Sequence[str], device_map: Mapping[str, str]) -> dict[str, torch.device]:
    """Parameter (or checkpoint tensor) name -> the device of its module: the longest prefix of
    the name in the map ('' covers everything)."""
    out: dict[str, torch.device] = {}
    for name in names:
        parts = name.split(".")
        for cut in range(len(parts), -1, -1):
            key = ".".join(parts[:cut])
            if key in device_map:
                out[name] = torch.device(device_map[key])
                break
        else:
            raise KeyError(f"no device for {name!r} in the device map")
    return out


def dispatch(model: torch.nn.Module, device_map: Mapping[str, str]) -> torch.nn.Module:
    """Move each module to its device with accelerate's hooks between them. The main device is
    the CPU when the map has it, so CPU blocks run there (accelerate would otherwise treat them
    as offloaded: kept on the CPU, copied to the GPU at each forward, and not the parameters an
    in-place merge writes into)."""
    from accelerate import dispatch_model

    devices = set(device_map.values())
    if len(devices) == 1:  # one device: no hooks, a plain move
        return model.to(next(iter(devices)))
    main = "cpu" if "cpu" in devices else device_map[next(iter(device_map))]
    return dispatch_model(model, device_map=dict(device_map), main_device=main)


def load_spanning(
    path: str, dtype: torch.dtype, devices: Sequence[str], **kwargs: Any
) -> tuple[torch.nn.Module, dict[str, str]]:
    """The reference model loaded on the host, split by layer over `devices` and dispatched;
    returns it with its device map."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    model.tie_weights()
    device_map = layer_device_map(model, devices, dtype)
    return dispatch(model, device_map), device_map


def worker_devices(device: str, gpus: int) -> tuple[str, ...]:
    """The devices of a worker that was given `gpus` GPUs (Ray numbers them from 0 inside it)."""
    if gpus <= 1 or not device.startswith("cuda"):
        return ()
    return tuple(f"cuda:{i}" for i in range(gpus))

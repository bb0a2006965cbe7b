"""Merge throughput: `evomerge merge` versus `mergekit-yaml` on the same configs, same run, and
in-memory merge bandwidth versus a plain memory copy measured on the same device.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from evomerge.safetensors_stream import ShardStream, TensorSpec, assign_shards, shard_names

# ~0.39B parameters: the size the issue names, small enough for 2 CPU cores.
LLAMA_04B = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=20,
    num_attention_heads=16,
    num_key_value_heads=16,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
LLAMA_TINY = dict(
    LLAMA_04B,
    vocab_size=1000,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
)


def make_random_llama(
    out: Path, size: dict[str, Any], *, seed: int, base: Path | None = None, noise: float = 0.01
) -> Path:
    """A random Llama checkpoint in bf16 (a base), or base + seeded noise (a 'fine-tune')."""
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    config = LlamaConfig(**size)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    specs = [TensorSpec(k, s, torch.bfloat16) for k, s in shapes.items()]
    shards = assign_shards(specs, 2 * 2**30)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    base_handle = safe_open(str(base / "model.safetensors"), framework="pt") if base else None
    for group, fname in zip(shards, shard_names(len(shards)), strict=True):
        stream = ShardStream(tmp / fname, group)
        for spec in group:
            t = torch.randn(spec.shape, generator=gen) * (noise if base_handle else 0.02)
            if base_handle is not None:
                t += base_handle.get_tensor(spec.name).float()
            stream.write(spec.name, t.to(torch.bfloat16))
        stream.close()
    config.dtype = "bfloat16"
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp)
    tmp.rename(out)
    return out


def bench_models(root: Path, size: dict[str, Any]) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    base = make_random_llama(root / "base", size, seed=0)
    return {
        "base": base,
        "ft1": make_random_llama(root / "ft1", size, seed=1, base=base),
        "ft2": make_random_llama(root / "ft2", size, seed=2, base=base),
    }


def configs(models: dict[str, Path]) -> dict[str, dict[str, Any]]:
    ft = [{"model": str(models["ft1"])}, {"model": str(models["ft2"])}]
    return {
        "linear": {
            "merge_method": "linear",
            "models": [{**m, "parameters": {"weight": 0.5}} for m in ft],
            "dtype": "bfloat16",
        },
        "ties": {
            "merge_method": "ties",
            "base_model": str(models["base"]),
            "models": [{**m, "parameters": {"weight": 0.5, "density": 0.5}} for m in ft],
            "parameters": {"normalize": True},
            "dtype": "bfloat16",
        },
    }


def _time_cmd(cmd: list[str]) -> float:
    """Wall seconds of one command, started with no dirty pages from the previous one pending
    (else its disk flush lands in the next tool's time). evomerge's time includes its fsync of
    the checkpoint; mergekit-yaml does not fsync."""
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def copy_bandwidth(nbytes: int, device: str, repeats: int = 5) -> float:
    """GB/s of a plain tensor copy (bytes read + bytes written), the hardware reference."""
    n = max(nbytes // 2, 1)
    src = torch.randn(n, device=device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def in_memory_merge(
    models: dict[str, Path], cfg: dict[str, Any], device: str, repeats: int = 3
) -> dict[str, float]:
    """Seconds and GB/s of InPlaceMerger.apply with resident sources (the search hot path)."""
    from evomerge.mergekit_yaml import from_mergekit
    from evomerge.plan import open_readers
    from evomerge.resident import InPlaceMerger, ResidentSources

    recipe = from_mergekit(cfg)
    readers = open_readers(recipe)
    sources = ResidentSources(readers, device=device)
    from evomerge.plan import build_layout

    ref = readers[recipe.reference_model]
    live = {
        n: torch.empty(ref.infos[n].shape, dtype=torch.bfloat16, device=device) for n in ref.names()
    }
    merger = InPlaceMerger(live, sources, build_layout(recipe, readers))
    best = min(merger.apply(recipe) for _ in range(repeats))
    out_bytes = sum(t.numel() * t.element_size() for t in live.values())
    moved = out_bytes * (len(readers) + 1)  # every source (base too) read once, result written once
    return {"seconds": best, "gbps": moved / best / 1e9, "bytes": moved}


def task_arithmetic_config(models: dict[str, Path]) -> dict[str, Any]:
    """The search's usual candidate: base + per-model weights of two task vectors."""
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models["ft1"]), "parameters": {"weight": 0.6}},
            {"model": str(models["ft2"]), "parameters": {"weight": 0.5}},
        ],
        "dtype": "bfloat16",
    }


def run_merge_bench(
    work: Path,
    *,
    size: str = "0.4b",
    device: str = "cpu",
    mergekit: bool = True,
    repeats: int = 2,
) -> dict[str, Any]:
    """Best of `repeats` runs per tool: on a shared machine (cloud disk throttling, neighbours)
    single runs here varied up to 10x; the minimum is the tool's own cost."""
    dims = LLAMA_04B if size == "0.4b" else LLAMA_TINY
    t0 = time.perf_counter()
    models = bench_models(work / f"models-{size}", dims)
    build_s = time.perf_counter() - t0
    params = sum(
        v["shape"][0] * (v["shape"][1] if len(v["shape"]) > 1 else 1)
        for k, v in _header(models["base"]).items()
        if k != "__metadata__"
    )
    evomerge_bin = str(Path(sys.executable).with_name("evomerge"))
    mergekit_bin = str(Path(sys.executable).with_name("mergekit-yaml"))
    rows: dict[str, Any] = {
        "params": params,
        "device": device,
        "models_build_seconds": round(build_s, 1),
        "methods": {},
    }
    for name, cfg in configs(models).items():
        path = work / f"{name}.yaml"
        path.write_text(json.dumps(cfg))
        out = work / f"out-evomerge-{name}"
        mk_out = work / f"out-mergekit-{name}"
        ours_cmd = [evomerge_bin, "merge", str(path), "--out", str(out), "--force", "--quiet"]
        ours_cmd += ["--device", device]
        mk_flags = ["--no-copy-tokenizer", "--quiet"] + (
            ["--cuda"] if device.startswith("cuda") else []
        )
        with_mergekit = mergekit and Path(mergekit_bin).exists()
        ours_runs: list[float] = []
        theirs_runs: list[float] = []
        for _ in range(max(1, repeats)):  # alternating, so a slow spell of the machine hits both
            ours_runs.append(_time_cmd(ours_cmd))
            shutil.rmtree(out, ignore_errors=True)
            if with_mergekit:
                shutil.rmtree(mk_out, ignore_errors=True)
                theirs_runs.append(_time_cmd([mergekit_bin, str(path), str(mk_out), *mk_flags]))
                shutil.rmtree(mk_out, ignore_errors=True)
        row: dict[str, Any] = {"evomerge_s": round(min(ours_runs), 2), "evomerge_runs": ours_runs}
        if theirs_runs:
            row["mergekit_s"] = round(min(theirs_runs), 2)
            row["mergekit_runs"] = theirs_runs
            row["speedup"] = round(min(theirs_runs) / min(ours_runs), 2)
        rows["methods"][name] = row
    for key, cfg in (
        ("in_memory_linear", configs(models)["linear"]),
        ("in_memory_task_arithmetic", task_arithmetic_config(models)),
    ):
        os.sync()  # no writeback of the disk merges competing for the memory bus
        mem = in_memory_merge(models, cfg, device, repeats=5)
        bw = copy_bandwidth(mem["bytes"] // 3, device)
        rows[key] = {
            "seconds": round(mem["seconds"], 3),
            "gbps": round(mem["gbps"], 2),
            "copy_gbps": round(bw, 2),
            "fraction_of_copy": round(mem["gbps"] / bw, 3),
        }
    return rows


def _header(path: Path) -> dict[str, Any]:
    f = path / "model.safetensors"
    if not f.exists():
        f = sorted(path.glob("*.safetensors"))[0]
        merged: dict[str, Any] = {}
        for shard in sorted(path.glob("*.safetensors")):
            merged.update(_read_header(shard))
        return merged
    return _read_header(f)


def _read_header(f: Path) -> dict[str, Any]:
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(n))

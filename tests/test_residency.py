"""Residency tiers (evomerge/residency): device, host and disk give the same weights and trials;
the host tier's slabs and stager, and the disk tier's memory, measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.checkpoint import CheckpointReader
from evomerge.cli import main
from evomerge.config import parse_study
from evomerge.errors import ConfigError
from evomerge.merge import MergeSettings, merge_to_disk
from evomerge.plan import model_layout, resolve_task
from evomerge.recipe import Recipe
from evomerge.residency import TIERS, resolve_residency
from evomerge.residency.stores import (
    ALIGN,
    HOST_SLAB_MIN,
    DiskSources,
    HostSources,
    make_sources,
    pack_host,
    task_keys,
)
from evomerge.resident import InPlaceMerger, ResidentSources
from evomerge.runstore import RunStore
from tests.model_factory import save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A float32 base, a float32 and a bfloat16 fine-tune: tiers must keep each file's dtype."""
    root = tmp_path_factory.mktemp("residency")
    base = save_tiny_llama(root / "base", seed=0, layers=2)
    return {
        "base": base,
        "a": save_tiny_llama(root / "a", seed=1, base=base, layers=2),
        "b": save_tiny_llama(root / "b", seed=2, base=base, layers=2, dtype=torch.bfloat16),
    }


def readers_of(models: dict[str, Path]) -> dict[str, CheckpointReader]:
    return {name: CheckpointReader(path) for name, path in models.items()}


SECTIONS = {
    "linear": [{"method": "linear", "models": {"a": {"weight": [0.2, 0.8]}, "b": {"weight": 0.5}}}],
    "task_arithmetic": [
        {"method": "task_arithmetic", "models": {"a": {"weight": 0.7}, "b": {"weight": 0.4}}}
    ],
    "ties": [
        {
            "method": "ties",
            "models": {"a": {"weight": 0.6, "density": 0.3}, "b": {"weight": 1.0, "density": 0.7}},
        }
    ],
    "dare_ties": [  # random masks: the generator is seeded per tensor, the same in every tier
        {
            "method": "dare_ties",
            "models": {"a": {"weight": 0.5, "density": 0.4}, "b": {"weight": 0.5, "density": 0.6}},
        }
    ],
    "slerp": [{"method": "slerp", "parameters": {"t": 0.3}, "models": {"base": {}, "a": {}}}],
    "model_stock": [{"method": "model_stock", "models": {"a": {}, "b": {}}}],
}


def recipe_of(models: dict[str, Path], method: str) -> Recipe:
    return Recipe(
        models={n: str(p) for n, p in models.items()},
        base_model="base",
        dtype="float32",
        seed=3,
        sections=SECTIONS[method],
    )


def merged_in_place(models: dict[str, Path], tier: str, recipes: list[Recipe]) -> dict:
    readers = readers_of(models)
    layout = model_layout(readers, "base")
    targets = {o.name: torch.full(o.shape, float("nan")) for o in layout}
    merger = InPlaceMerger(targets, make_sources(tier, readers), layout)
    for recipe in recipes:  # the last one is what the targets hold
        merger.apply(recipe)
    return targets


@pytest.mark.parametrize("method", list(SECTIONS))
def test_every_tier_writes_the_weights_of_the_disk_merge(models, tmp_path, method):
    """Bit-equal to `merge_to_disk` (which reads through the readers' own cached mappings), also
    after another candidate went through the same slabs first."""
    recipe = recipe_of(models, method)
    merge_to_disk(recipe, MergeSettings(out_dir=tmp_path / "disk", progress=False))
    expected = load_file(tmp_path / "disk" / "model.safetensors")
    other = recipe_of(models, "ties" if method != "ties" else "linear")
    for tier in TIERS:
        got = merged_in_place(models, tier, [other, recipe])
        assert set(got) == set(expected)
        for name, t in expected.items():
            assert torch.equal(got[name], t), (tier, method, name)


def test_make_sources_gives_each_tier_its_store(models):
    readers = readers_of(models)
    assert isinstance(make_sources("device", readers), ResidentSources)
    assert isinstance(make_sources("host", readers), HostSources)
    disk = make_sources("disk", readers)
    assert isinstance(disk, DiskSources) and disk.nbytes == 0
    with pytest.raises(ValueError, match="auto"):
        make_sources("auto", readers)  # type: ignore[arg-type]


# ---- the host tier: slabs and the stager ---------------------------------------------------------


def test_host_slabs_hold_every_tensor_as_stored_outside_the_files(models):
    readers = readers_of(models)
    tensors, nbytes = pack_host(readers, pin=False)
    assert set(tensors) == {(m, n) for m, r in readers.items() for n in r.names()}
    expected_bytes = 0
    for (model, name), t in tensors.items():
        ref = readers[model].get(name)
        assert t.dtype == ref.dtype and torch.equal(t, ref), (model, name)
        assert t.storage_offset() * t.element_size() % ALIGN == 0  # any dtype may follow
        expected_bytes += -(-ref.numel() * ref.element_size() // ALIGN) * ALIGN
    assert nbytes == expected_bytes  # tiny models: one slab, filled to its aligned sum
    storages = {t.untyped_storage().data_ptr() for t in tensors.values()}
    assert len(storages) == 1 and nbytes <= HOST_SLAB_MIN


def test_slabs_are_powers_of_two_filled_first_fit(tmp_path, monkeypatch):
    """Slabs as large as the largest tensor rounded up to a power of two (at least the minimum,
    1 MiB here instead of 256 MiB), each tensor in the first slab with room."""
    import evomerge.residency.stores as stores

    monkeypatch.setattr(stores, "HOST_SLAB_MIN", 1 << 20)
    kib = 256  # float32 elements per KiB
    sizes = {"a": 384 * kib, "b": 384 * kib, "c": 384 * kib, "d": 1536 * kib, "e": 4 * kib}
    save_file(
        {k: torch.full((n,), float(i)) for i, (k, n) in enumerate(sizes.items())},
        str(tmp_path / "model.safetensors"),
    )
    readers = {"m": CheckpointReader(tmp_path)}
    assert readers["m"].names() == list(sizes)  # the file order the packing follows
    tensors, nbytes = pack_host(readers, pin=False)
    slab_of = {k[1]: t.untyped_storage() for k, t in tensors.items()}
    ptr = {k: s.data_ptr() for k, s in slab_of.items()}
    # cap 2 MiB: a, b, c fill 1.125 MiB; d (1.5 MiB) opens a second slab; e fits in the first
    assert ptr["a"] == ptr["b"] == ptr["c"] == ptr["e"] != ptr["d"]
    assert slab_of["a"].nbytes() == (3 * 384 + 4) * 1024 and slab_of["d"].nbytes() == 1536 * 1024
    assert nbytes == sum(sizes.values()) * 4
    for i, (k, n) in enumerate(sizes.items()):
        assert torch.equal(tensors[("m", k)], torch.full((n,), float(i))), k


def test_the_stager_alternates_two_slabs_one_task_ahead(models):
    readers = readers_of(models)
    sources = HostSources(readers)
    recipe = recipe_of(models, "ties")
    layout = model_layout(readers, "base")
    tasks = [resolve_task(recipe, out) for out in layout]
    cpu = [torch.device("cpu")] * len(tasks)
    seen = []
    for task, load in zip(tasks, sources.feed(tasks, cpu), strict=True):
        ptrs = set()
        for model, name in task_keys(task):
            t = load(model, name)
            assert torch.equal(t, readers[model].get(name)), (model, name)
            assert t.data_ptr() != sources.load(model, name).data_ptr()  # a staged copy
            ptrs.add(t.untyped_storage().data_ptr())
        assert len(ptrs) == 1  # one task's sources share one slab
        seen.append(ptrs.pop())
    (slots,) = sources.stager.slots.values()
    slabs = [s.untyped_storage().data_ptr() for s in slots.slabs]
    assert seen == [slabs[i % 2] for i in range(len(tasks))]
    largest = max(
        sum(-(-readers[m].get(n).nbytes // ALIGN) * ALIGN for m, n in task_keys(t)) for t in tasks
    )
    assert slots.capacity == largest and sources.stager.device_bytes == 2 * largest


def test_a_merge_that_raises_midway_leaves_the_stager_usable(models, tmp_path, monkeypatch):
    import evomerge.resident

    readers = readers_of(models)
    layout = model_layout(readers, "base")
    targets = {o.name: torch.zeros(o.shape) for o in layout}
    merger = InPlaceMerger(targets, make_sources("host", readers), layout)
    real, calls = evomerge.resident.run_task, []

    def third_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(evomerge.resident, "run_task", third_fails)
    with pytest.raises(RuntimeError, match="boom"):
        merger.apply(recipe_of(models, "ties"))
    monkeypatch.setattr(evomerge.resident, "run_task", real)
    good = recipe_of(models, "task_arithmetic")
    merger.apply(good)
    merge_to_disk(good, MergeSettings(out_dir=tmp_path / "d", progress=False))
    for name, t in load_file(tmp_path / "d" / "model.safetensors").items():
        assert torch.equal(targets[name], t), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_on_cuda_host_and_disk_stream_the_weights_of_device(models, method):
    """The CUDA path: pinned host slabs, the side stream and its events give the device tier's
    weights, candidate after candidate (the second reuses both slabs)."""
    readers = readers_of(models)
    layout = model_layout(readers, "base")
    recipes = [recipe_of(models, "linear"), recipe_of(models, method)]
    got = {}
    for tier in TIERS:
        targets = {o.name: torch.full(o.shape, float("nan"), device="cuda") for o in layout}
        sources = make_sources(tier, readers, device="cuda")
        merger = InPlaceMerger(targets, sources, layout)
        for recipe in recipes:
            merger.apply(recipe)
        got[tier] = {n: t.cpu() for n, t in targets.items()}
        if tier == "host":
            assert all(t.is_pinned() for t in sources.tensors.values())  # type: ignore[attr-defined]
    for tier in ("host", "disk"):
        for name, t in got["device"].items():
            assert torch.equal(got[tier][name], t), (tier, name)


# ---- config ----------------------------------------------------------------------------------------


def test_residency_config_and_resolution(tmp_path):
    base = {
        "name": "s",
        "models": {"sources": ["a", "b"]},
        "search_space": {"preset": "linear"},
        "tasks": {"search": ["t"]},
    }
    assert parse_study(base, "s.yaml").executor.residency == "auto"
    cfg = parse_study({**base, "executor": {"residency": "disk"}}, "s.yaml")
    assert cfg.executor.residency == "disk" and "residency" not in cfg.executor.options
    with pytest.raises(ConfigError, match="residency"):
        parse_study({**base, "executor": {"residency": "gpu"}}, "s.yaml")
    assert resolve_residency("auto") == "device"
    assert [resolve_residency(t) for t in TIERS] == list(TIERS)
    with pytest.raises(ConfigError, match="unknown tier"):
        resolve_residency("ram")


# ---- whole studies -----------------------------------------------------------------------------


def test_every_tier_gives_the_trials_of_device_on_the_small_zoo(small_zoo, tmp_path, capsys):
    """1 local worker, fixed seed: the same genomes, fitness and metrics, trial by trial."""
    data = yaml.safe_load(Path(small_zoo.study).read_text())
    data["executor"] = {"kind": "local", "workers": 1}
    data["budget"] = {"max_trials": 4}
    data["device"] = "cpu"
    runs = {}
    for tier in TIERS:
        data["executor"]["residency"] = tier
        path = tmp_path / f"{tier}.yaml"
        path.write_text(yaml.safe_dump(data))
        code = main(["run", str(path), "--runs-dir", str(tmp_path), "--name", tier, "--quiet"])
        assert code == 0, capsys.readouterr().err
        stored = yaml.safe_load((tmp_path / tier / "study.yaml").read_text())
        assert stored["executor"]["residency"] == tier
        runs[tier] = [
            (r.trial, json.dumps(r.genome, sort_keys=True), r.fitness, r.scores, r.status)
            for r in RunStore(tmp_path / tier).read_trials()
        ]
    assert len(runs["device"]) == 4 and all(r[4] == "ok" for r in runs["device"])
    assert len({r[1] for r in runs["device"]}) == 4
    assert runs["host"] == runs["device"]
    assert runs["disk"] == runs["device"]


# ---- the disk tier's memory ---------------------------------------------------------------------

RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from evomerge.checkpoint import CheckpointReader
    from evomerge.memory import keep_freed_memory
    from evomerge.plan import model_layout
    from evomerge.recipe import Recipe
    from evomerge.residency.stores import make_sources
    from evomerge.resident import InPlaceMerger

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    keep_freed_memory()  # as a worker does: freed heap is kept, so growth is never hidden
    tier, root = sys.argv[1], sys.argv[2]
    names = ["base", "a", "b"]
    readers = {n: CheckpointReader(f"{root}/{n}") for n in names}
    layout = model_layout(readers, "base")
    live = {o.name: torch.zeros(o.shape) for o in layout}  # the live model, paged in
    recipe = Recipe(
        models={n: f"{root}/{n}" for n in names}, base_model="base", dtype="float32",
        sections=[{"method": "task_arithmetic", "models": {"a": {"weight": 0.5}, "b": {"weight": 0.3}}}],
    )
    before = rss()
    merger = InPlaceMerger(live, make_sources(tier, readers), layout)
    for _ in range(3):
        merger.apply(recipe)
    after = rss()
    check = float(sum(t.double().sum() for t in live.values()))
    print(json.dumps({"growth": after - before, "check": check}))
    """
)


@pytest.fixture(scope="module")
def big_models(tmp_path_factory) -> tuple[Path, int]:
    """Three float32 checkpoints of 96 MiB each (24 tensors of 1M elements): 288 MiB of sources."""
    root = tmp_path_factory.mktemp("rss")
    gen = torch.Generator().manual_seed(0)
    base = {
        f"model.layers.{i}.mlp.weight": torch.randn(1024, 1024, generator=gen) for i in range(24)
    }
    total = 0
    for k, name in enumerate(["base", "a", "b"]):
        tensors = {n: t + 0.01 * k for n, t in base.items()}
        (root / name).mkdir()
        save_file(tensors, str(root / name / "model.safetensors"))
        (root / name / "config.json").write_text(json.dumps({"num_hidden_layers": 24}))
        total += sum(t.nbytes for t in tensors.values())
    return root, total


def measure(tier: str, root: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, tier, str(root)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_disk_keeps_rss_growth_under_half_the_sources(big_models):
    """Measured in a fresh process: the disk tier's RSS grows by less than half the sources'
    bytes over loading and three merges; the device tier (the control) holds all of them."""
    root, sources_bytes = big_models
    disk = measure("disk", root)
    device = measure("device", root)
    assert disk["check"] == device["check"]  # the same merged weights
    assert device["growth"] > 0.9 * sources_bytes  # the measurement sees resident sources
    assert disk["growth"] < 0.5 * sources_bytes, (disk, sources_bytes)


# ---- the bench ---------------------------------------------------------------------------------


def test_residency_bench_reports_every_tier_against_its_copy(tmp_path):
    """`evomerge bench --parts residency` on the tiny random Llama (the 0.4B one takes minutes)."""
    from evomerge.bench.residency_bench import print_residency, run_residency_bench

    report = run_residency_bench(tmp_path, size="tiny", repeats=2, reference_bytes=1 << 24)
    assert report["models"] == 4 and set(report["tiers"]) == set(TIERS)
    rows = report["tiers"]
    for tier, row in rows.items():
        assert row["merge_s"] > 0 and row["gbps"] > 0 and row["reference_gbps"] > 0, tier
        assert row["fraction_of_reference"] == pytest.approx(
            row["gbps"] / row["reference_gbps"], rel=0.02
        )
        assert row["target"] is None  # CUDA targets only
    source = report["source_bytes"]
    assert rows["device"]["moved_bytes"] == source + 2 * report["params"]
    assert rows["host"]["moved_bytes"] == rows["disk"]["moved_bytes"] == source
    assert rows["device"]["held_bytes"] == source and rows["disk"]["held_bytes"] == 0
    assert source <= rows["host"]["held_bytes"] < source + 512 * 500  # aligned slabs
    files = sum(f.stat().st_size for f in tmp_path.rglob("*.safetensors"))
    assert source < files < source * 1.01  # the tensor data of the four checkpoints
    print_residency(report)  # the table prints from the same dict

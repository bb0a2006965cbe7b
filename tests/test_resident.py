"""Resident sources and in-place merging (evomerge/resident.py), the search's hot path."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.checkpoint import CheckpointReader
from evomerge.errors import IncompatibleModelsError
from evomerge.merge import MergeSettings, merge_to_disk
from evomerge.plan import model_layout
from evomerge.recipe import Recipe
from evomerge.resident import InPlaceMerger, ResidentSources
from tests.model_factory import save_tiny_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resident")
    base = save_tiny_llama(root / "base", seed=0, layers=2)
    return {
        "base": base,
        "a": save_tiny_llama(root / "a", seed=1, base=base, layers=2),
        "b": save_tiny_llama(root / "b", seed=2, base=base, layers=2),
    }


def readers_of(models: dict[str, Path]) -> dict[str, CheckpointReader]:
    return {name: CheckpointReader(path) for name, path in models.items()}


def header(file: Path) -> dict:
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return {k: v for k, v in json.loads(data[8 : 8 + n]).items() if k != "__metadata__"} | {
        "__data_start__": 8 + n
    }


def overwrite_in_place(file: Path, tensor: str) -> None:
    """Zero one tensor's bytes in the file itself (same inode: an mmap of it sees the change)."""
    h = header(file)
    start, end = h[tensor]["data_offsets"]
    with open(file, "r+b") as fh:
        fh.seek(h["__data_start__"] + start)
        fh.write(b"\x00" * (end - start))


def mapped_ranges(file: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(file.resolve())):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


# ---- ResidentSources -----------------------------------------------------------------------


def test_sources_are_copied_out_of_the_mmapped_file(tmp_path):
    path = save_tiny_llama(tmp_path / "m", seed=4, layers=1)
    file = path / "model.safetensors"
    reader = CheckpointReader(path)
    sources = ResidentSources({"m": reader})
    name = "model.embed_tokens.weight"
    kept = sources.load("m", name).clone()
    view = reader.get(name)  # what safetensors hands out: a view of the mapped file
    if Path("/proc/self/maps").exists():
        ranges = mapped_ranges(file)
        assert ranges, "the reader maps the file"
        for t in sources.tensors.values():
            ptr = t.untyped_storage().data_ptr()
            assert not any(lo <= ptr < hi for lo, hi in ranges)
    overwrite_in_place(file, name)
    assert torch.count_nonzero(view) == 0  # control: the file did change under the mmap
    assert torch.equal(sources.load("m", name), kept)  # the resident copy did not


def test_sources_hold_every_tensor_of_every_model_as_stored(tmp_path, models):
    bf16 = save_tiny_llama(
        tmp_path / "bf16", seed=5, base=models["base"], dtype=torch.bfloat16, layers=2
    )
    readers = {"base": CheckpointReader(models["base"]), "h": CheckpointReader(bf16)}
    sources = ResidentSources(readers, compute_dtype=torch.float64)
    assert sources.compute_dtype == torch.float64 and sources.device == torch.device("cpu")
    assert set(sources.tensors) == {(m, n) for m, r in readers.items() for n in r.names()}
    for (model, name), t in sources.tensors.items():
        assert t.dtype == (torch.bfloat16 if model == "h" else torch.float32), (model, name)
        assert torch.equal(t, readers[model].get(name))
    assert sources.load("h", "lm_head.weight") is sources.tensors[("h", "lm_head.weight")]


def test_nbytes_is_the_tensor_data_of_the_files(tmp_path, models):
    bf16 = save_tiny_llama(
        tmp_path / "bf16", seed=5, base=models["base"], dtype=torch.bfloat16, layers=2
    )
    paths = {"base": models["base"], "h": bf16}
    sources = ResidentSources({n: CheckpointReader(p) for n, p in paths.items()})
    expected = 0
    for p in paths.values():
        h = header(p / "model.safetensors")
        expected += sum(
            e - s for k, v in h.items() if k != "__data_start__" for s, e in [v["data_offsets"]]
        )
    assert sources.nbytes == expected


# ---- InPlaceMerger -------------------------------------------------------------------------


def recipe_of(models: dict[str, Path], method: str) -> Recipe:
    if method == "linear":
        sections = [
            {
                "layers": [0, 2],
                "method": "linear",
                "models": {"a": {"weight": [0.2, 0.8]}, "b": {"weight": 0.5}},
            },
            {
                "method": "linear",
                "parameters": {"normalize": False},
                "models": {"a": {"weight": 0.3}, "b": {"weight": 0.7}},
            },
        ]
    else:
        sections = [
            {
                "method": "ties",
                "parameters": {"normalize": True},
                "models": {
                    "a": {
                        "weight": 0.6,
                        "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.8}],
                    },
                    "b": {"weight": [1.0, 0.4], "density": 0.5},
                },
            }
        ]
    return Recipe(
        models={n: str(p) for n, p in models.items()},
        base_model="base",
        dtype="float32",
        sections=sections,
    )


def live_targets(models: dict[str, Path]) -> tuple[dict[str, torch.Tensor], list]:
    readers = readers_of(models)
    layout = model_layout(readers, "base")
    targets = {o.name: torch.full(o.shape, float("nan")) for o in layout}
    return targets, layout


def disk_merge(recipe: Recipe, out: Path) -> dict[str, torch.Tensor]:
    merge_to_disk(recipe, MergeSettings(out_dir=out, progress=False))
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_in_place_merge_is_bit_equal_to_the_disk_merge(models, tmp_path, method):
    recipe = recipe_of(models, method)
    targets, layout = live_targets(models)
    ptrs = {n: t.data_ptr() for n, t in targets.items()}
    merger = InPlaceMerger(targets, ResidentSources(readers_of(models)), layout)
    seconds = merger.apply(recipe)
    assert isinstance(seconds, float) and seconds >= 0
    disk = disk_merge(recipe, tmp_path / "disk")
    assert set(disk) == set(targets)
    for name, t in disk.items():
        assert targets[name].data_ptr() == ptrs[name]  # written into, never replaced
        assert torch.equal(targets[name], t), name


def test_each_apply_replaces_the_previous_candidate(models, tmp_path):
    targets, layout = live_targets(models)
    merger = InPlaceMerger(targets, ResidentSources(readers_of(models)), layout)
    merger.apply(recipe_of(models, "ties"))
    second = recipe_of(models, "linear")
    merger.apply(second)
    disk = disk_merge(second, tmp_path / "disk")
    for name, t in disk.items():
        assert torch.equal(targets[name], t), name


def test_only_layout_tensors_are_targets(models):
    targets, layout = live_targets(models)
    extra = torch.ones(3)
    merger = InPlaceMerger({**targets, "rotary.inv_freq": extra}, ResidentSources({}), layout)
    assert list(merger.targets) == [o.name for o in layout]
    assert "rotary.inv_freq" not in merger.targets


def test_a_missing_target_parameter_is_named(models):
    targets, layout = live_targets(models)
    gone = layout[1].name
    del targets[gone]
    with pytest.raises(IncompatibleModelsError, match="different architecture") as info:
        InPlaceMerger(targets, ResidentSources({}), layout)
    assert repr(gone) in str(info.value) and "(1 missing)" in str(info.value)

"""Merge engine: recipes to disk and in place, settings, and user errors through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.recipe_loader import load_recipe_file
from tests.model_factory import save_tiny_llama


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = save_tiny_llama(root / "base", seed=0)
    return {
        "base": base,
        "a": save_tiny_llama(root / "a", seed=1, base=base),
        "b": save_tiny_llama(root / "b", seed=2, base=base),
        "c": save_tiny_llama(root / "c", seed=3, base=base),
    }


def weights(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # drop output of fixtures (e.g. save_pretrained's progress bars)
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_linear_recipe_matches_reference_and_loads(zoo, tmp_path, capsys):
    recipe = {
        "evomerge_recipe": 1,
        "models": {k: str(v) for k, v in zoo.items() if k != "base"},
        "sections": [
            {
                "layers": [0, 2],
                "filter": "mlp",
                "method": "linear",
                "models": {"a": {"weight": 3.0}, "b": {"weight": 1.0}},
            },
            {
                "method": "linear",
                "parameters": {"normalize": False},
                "models": {"a": {"weight": 0.5}, "c": {"weight": 0.5}},
            },
        ],
    }
    out = tmp_path / "merged"
    code, stdout, _ = run_cli(
        ["merge", str(write_yaml(tmp_path / "r.yaml", recipe)), "--out", str(out), "--quiet"],
        capsys,
    )
    assert code == 0, stdout
    got = weights(out)
    a, b, c = weights(zoo["a"]), weights(zoo["b"]), weights(zoo["c"])
    for name, t in got.items():
        layer_mlp = "mlp" in name and (".layers.0." in name or ".layers.1." in name)
        want = (
            (0.75 * a[name].double() + 0.25 * b[name].double())
            if layer_mlp
            else 0.5 * a[name].double() + 0.5 * c[name].double()
        )
        torch.testing.assert_close(t.double(), want, rtol=1e-6, atol=1e-7)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert ids.shape == (1, 8)


def test_sharded_output_has_index_and_loads(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.merge import MergeSettings, merge_to_disk

    recipe = load_recipe_file(
        write_yaml(
            tmp_path / "mk.yaml",
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(zoo["a"]), "parameters": {"weight": 1.0}},
                    {"model": str(zoo["b"]), "parameters": {"weight": 1.0}},
                ],
                "dtype": "bfloat16",
            },
        )
    )
    settings = MergeSettings(out_dir=tmp_path / "out", max_shard_bytes=20_000, progress=False)
    stats = merge_to_disk(recipe, settings)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "out" / s).exists() for s in shards)
    assert stats.tensors == len(index["weight_map"])
    got = weights(tmp_path / "out")
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    a, b = weights(zoo["a"]), weights(zoo["b"])
    name = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(got[name], ((a[name] + b[name]) / 2).to(torch.bfloat16))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 4


def test_in_place_merge_equals_disk_merge(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.merge import MergeSettings, merge_to_disk
    from evomerge.plan import open_readers
    from evomerge.resident import InPlaceMerger, ResidentSources

    recipe = load_recipe_file(
        write_yaml(
            tmp_path / "ties.yaml",
            {
                "merge_method": "ties",
                "base_model": str(zoo["base"]),
                "models": [
                    {"model": str(zoo["a"]), "parameters": {"weight": [0.2, 0.9], "density": 0.5}},
                    {
                        "model": str(zoo["b"]),
                        "parameters": {
                            "weight": 0.6,
                            "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.8}],
                        },
                    },
                ],
                "parameters": {"normalize": True},
                "dtype": "float32",
            },
        )
    )
    merge_to_disk(recipe, MergeSettings(out_dir=tmp_path / "disk", progress=False))
    readers = open_readers(recipe)
    live = AutoModelForCausalLM.from_pretrained(zoo["base"])
    merger = InPlaceMerger.for_model(live, recipe, readers, ResidentSources(readers))
    merger.apply(recipe)
    disk = weights(tmp_path / "disk")
    state = live.state_dict()
    for name, t in disk.items():
        assert torch.equal(state[name], t), name


def test_failed_merge_writes_nothing(zoo, tmp_path, capsys):
    other = save_tiny_llama(tmp_path / "wide", seed=5, hidden=48)
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": str(zoo["a"]), "parameters": {"weight": 1}},
            {"model": str(other), "parameters": {"weight": 1}},
        ],
    }
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["merge", str(write_yaml(tmp_path / "r.yaml", recipe)), "--out", str(out)], capsys
    )
    assert code == 2
    assert err.startswith("evomerge: error: ") and err.count("\n") == 1
    assert "tensor '" in err and "[64, 32]" in err and "[64, 48]" in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize(
    ("recipe", "needle"),
    [
        (
            {"merge_method": "lienar", "models": [{"model": "A", "parameters": {"weight": 1}}]},
            "did you mean 'linear'",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "BASE",
                "models": [{"model": "A", "parameters": {"weight": 1, "density": 1.5}}],
            },
            "density",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "BASE",
                "models": [{"model": "A", "parameters": {"weight": 1, "density": 0}}],
            },
            "density",
        ),
        (
            {
                "merge_method": "slerp",
                "base_model": "BASE",
                "models": [{"model": "A"}, {"model": "B"}, {"model": "BASE"}],
                "parameters": {"t": 0.5},
            },
            "slerp",
        ),
        (
            {"merge_method": "linear", "models": [{"model": "A", "parameters": {"wieght": 1}}]},
            "wieght",
        ),
        (
            {
                "merge_method": "linear",
                "models": [{"model": "/nonexistent/model", "parameters": {"weight": 1}}],
            },
            "/nonexistent/model",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(zoo, tmp_path, capsys, recipe, needle):
    text = yaml.safe_dump(recipe)
    for key in ("BASE", "A", "B"):
        target = {"BASE": zoo["base"], "A": zoo["a"], "B": zoo["b"]}[key]
        text = text.replace(f" {key}\n", f" {target}\n")
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", str(path), "--out", str(out)], capsys)
    assert code == 2, err
    assert err.startswith("evomerge: error: ") and err.count("\n") == 1, err
    assert needle in err
    assert not out.exists()


def test_refuses_non_empty_out_without_force(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    recipe = write_yaml(
        tmp_path / "r.yaml", {"merge_method": "passthrough", "models": [{"model": str(zoo["a"])}]}
    )
    code, _, err = run_cli(["merge", str(recipe), "--out", str(out)], capsys)
    assert code == 2 and "--force" in err and (out / "keep.txt").exists()
    code, _, _ = run_cli(["merge", str(recipe), "--out", str(out), "--force", "--quiet"], capsys)
    assert code == 0 and not (out / "keep.txt").exists()
    assert all(torch.equal(v, weights(zoo["a"])[k]) for k, v in weights(out).items())


def test_passthrough_slices_frankenmerge(zoo, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(zoo["a"]), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(zoo["b"]), "layer_range": [1, 4]}]},
        ],
        "dtype": "float32",
    }
    out = tmp_path / "franken"
    code, _, err = run_cli(
        ["merge", str(write_yaml(tmp_path / "f.yaml", recipe)), "--out", str(out), "--quiet"],
        capsys,
    )
    assert code == 0, err
    got, a, b = weights(out), weights(zoo["a"]), weights(zoo["b"])
    assert torch.equal(
        got["model.layers.2.mlp.up_proj.weight"], a["model.layers.2.mlp.up_proj.weight"]
    )
    assert torch.equal(
        got["model.layers.3.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"]
    )
    assert torch.equal(
        got["model.layers.5.mlp.up_proj.weight"], b["model.layers.3.mlp.up_proj.weight"]
    )
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6


def test_merge_settings_are_frozen_and_strict(tmp_path):
    from pydantic import ValidationError

    from evomerge.merge import MergeSettings

    s = MergeSettings(out_dir=str(tmp_path))
    assert s.out_dir == tmp_path and s.device == "cpu" and s.dtype is None
    assert s.max_shard_bytes == 5 * 2**30 and s.compute_dtype == torch.float32
    assert not s.allow_pickle and not s.overwrite and s.progress
    with pytest.raises(ValidationError):
        s.device = "cuda"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="force"):
        MergeSettings(out_dir=tmp_path, force=True)  # type: ignore[call-arg]


def test_output_dtype_flag_beats_recipe_which_beats_sources(tmp_path):
    from evomerge.merge import MergeSettings, merge_to_disk
    from evomerge.recipe import Recipe

    base = save_tiny_llama(tmp_path / "bf", seed=0, dtype=torch.bfloat16)
    other = save_tiny_llama(tmp_path / "bf2", seed=1, base=base, dtype=torch.bfloat16)
    data = {
        "models": {"x": str(base), "y": str(other)},
        "sections": [{"method": "linear", "models": {"x": {"weight": 1.0}, "y": {"weight": 1.0}}}],
    }
    cases = [({}, None, torch.bfloat16), ({"dtype": "fp16"}, None, torch.float16)]
    cases.append(({"dtype": "fp16"}, "float32", torch.float32))
    for i, (extra, flag, want) in enumerate(cases):
        recipe = Recipe.model_validate({**data, **extra})
        out = tmp_path / f"out{i}"
        merge_to_disk(recipe, MergeSettings(out_dir=out, dtype=flag, progress=False))
        assert {t.dtype for t in weights(out).values()} == {want}, (extra, flag)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg.get("dtype", cfg.get("torch_dtype")) == str(want).removeprefix("torch.")


def test_extra_files_land_beside_the_weights(zoo, tmp_path):
    from evomerge.merge import MergeSettings, merge_to_disk
    from evomerge.recipe import Recipe

    recipe = Recipe.model_validate(
        {
            "models": {"a": str(zoo["a"])},
            "sections": [{"method": "passthrough", "models": {"a": {}}}],
        }
    )
    files = {"README.md": "card\n", "plots/fitness.png": b"\x89PNG"}
    stats = merge_to_disk(
        recipe, MergeSettings(out_dir=tmp_path / "o", progress=False), extra_files=files
    )
    assert (tmp_path / "o" / "README.md").read_text() == "card\n"
    assert (tmp_path / "o" / "plots" / "fitness.png").read_bytes() == b"\x89PNG"
    assert stats.out_dir == (tmp_path / "o").resolve() and stats.tensors == len(weights(zoo["a"]))

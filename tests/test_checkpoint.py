"""Checkpoint reading: safetensors (single, sharded), pickles only when allowed, dtypes, layer names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.checkpoint import (
    CheckpointReader,
    layer_index,
    layer_suffix,
    parse_dtype,
    resolve_model_path,
    stored_float_dtype,
    with_layer_index,
)
from evomerge.cli import main
from evomerge.errors import ConfigError, MissingPathError, UnsafeCheckpointError
from tests.model_factory import save_tiny_llama


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("ckpt") / "m", seed=0)


def weights(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def pickled_copy(model: Path, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    folder.mkdir()
    torch.save({k: v.to(dtype) for k, v in weights(model).items()}, folder / "pytorch_model.bin")
    shutil.copy(model / "config.json", folder / "config.json")
    return folder


# ---------------------------------------------------------------- reading


def test_single_file_reader_gives_names_shapes_and_tensors(model):
    r = CheckpointReader(model)
    state = weights(model)
    assert set(r.names()) == set(state) and "lm_head.weight" in r
    info = r.infos["model.layers.1.mlp.up_proj.weight"]
    assert info.shape == (64, 32) and info.dtype == "F32" and info.file == "model.safetensors"
    got = r.get("model.layers.1.mlp.up_proj.weight", dtype=torch.float64)
    assert got.dtype == torch.float64
    assert torch.equal(got, state["model.layers.1.mlp.up_proj.weight"].double())
    assert r.num_layers == 4


def test_sharded_index_is_read(model, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(model).save_pretrained(sharded, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    r = CheckpointReader(sharded)
    assert {n: i.file for n, i in r.infos.items()} == index["weight_map"]
    state = weights(model)
    assert all(torch.equal(r.get(n), state[n]) for n in state)


def test_a_shard_named_in_the_index_must_exist(model, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(model, folder)
    index = {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        MissingPathError,
        match=r"shard .*model-00001-of-00002\.safetensors named in the index is missing",
    ):
        CheckpointReader(folder, where="model 'x'")


def test_layer_count_from_names_without_config(model, tmp_path):
    folder = tmp_path / "noconfig"
    folder.mkdir()
    shutil.copy(model / "model.safetensors", folder)
    r = CheckpointReader(folder)
    assert r.config == {} and r.num_layers == 4


def test_missing_folder_file_and_empty_folder(tmp_path):
    with pytest.raises(MissingPathError, match=r"model folder .*nothing does not exist"):
        resolve_model_path(str(tmp_path / "nothing"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(MissingPathError, match="is a file; expected a checkpoint folder"):
        resolve_model_path(str(tmp_path / "f.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingPathError, match=r"holds no \*\.safetensors weights"):
        CheckpointReader(tmp_path / "empty")


# ---------------------------------------------------------------- pickles


def test_pickles_are_refused_unless_allowed(model, tmp_path):
    folder = pickled_copy(model, tmp_path / "pickled")
    with pytest.raises(
        UnsafeCheckpointError, match=r"model 'p': .*pytorch_model\.bin.*--allow-pickle"
    ):
        CheckpointReader(folder, where="model 'p'")
    r = CheckpointReader(folder, allow_pickle=True)
    state = weights(model)
    assert set(r.names()) == set(state)
    assert torch.equal(r.get("lm_head.weight"), state["lm_head.weight"])


@pytest.mark.parametrize(("dtype", "code"), [(torch.float32, "F32"), (torch.bfloat16, "BF16")])
def test_pickled_tensors_report_safetensors_dtype_codes(model, tmp_path, dtype, code):
    r = CheckpointReader(pickled_copy(model, tmp_path / "p", dtype), allow_pickle=True)
    assert {i.dtype for i in r.infos.values()} == {code}
    assert stored_float_dtype(code) == dtype


def test_cli_refuses_pickles_unless_allowed(model, tmp_path, capsys):
    folder = pickled_copy(model, tmp_path / "pickled")
    other = save_tiny_llama(tmp_path / "other", seed=1, base=model)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(folder), "parameters": {"weight": 1}},
                    {"model": str(other), "parameters": {"weight": 1}},
                ],
            }
        )
    )
    capsys.readouterr()
    code = main(["merge", str(recipe), "--out", str(tmp_path / "o")])
    assert code == 2 and "--allow-pickle" in capsys.readouterr().err
    code = main(["merge", str(recipe), "--out", str(tmp_path / "o"), "--allow-pickle", "--quiet"])
    assert code == 0, capsys.readouterr().err
    name = "lm_head.weight"
    want = (weights(model)[name] + weights(other)[name]) / 2
    torch.testing.assert_close(weights(tmp_path / "o")[name], want)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("BF16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float64", torch.float64),
        (None, None),
        (torch.float16, torch.float16),
    ],
)
def test_parse_dtype(name, want):
    assert parse_dtype(name) == want


def test_parse_dtype_error_names_the_place_and_the_choices():
    with pytest.raises(ConfigError) as info:
        parse_dtype("int4", where="--dtype")
    assert (
        str(info.value) == "--dtype: unknown dtype 'int4' (use one of float32, bfloat16, float16)"
    )


@pytest.mark.parametrize(
    ("code", "want"),
    [
        ("F16", torch.float16),
        ("F64", torch.float64),
        ("I64", torch.float32),
        ("F8_E4M3", torch.float32),
    ],
)
def test_stored_float_dtype_computes_non_floats_in_float32(code, want):
    assert stored_float_dtype(code) == want


# ---------------------------------------------------------------- layer names


@pytest.mark.parametrize(
    ("name", "index", "suffix"),
    [
        ("model.layers.3.mlp.up_proj.weight", 3, ".mlp.up_proj.weight"),  # llama, mistral, qwen
        ("transformer.h.11.attn.c_attn.weight", 11, ".attn.c_attn.weight"),  # gpt2
        ("h.0.ln_1.bias", 0, ".ln_1.bias"),  # gpt2 without its prefix
        (
            "gpt_neox.layers.5.attention.query_key_value.weight",
            5,
            ".attention.query_key_value.weight",
        ),
        ("blocks.2.ffn.w1", 2, ".ffn.w1"),
        ("model.layers.12.mlp.experts.7.w1.weight", 12, ".mlp.experts.7.w1.weight"),  # first index
        ("model.embed_tokens.weight", None, None),
        ("transformer.wte.weight", None, None),
        ("lm_head.weight", None, None),
        ("model.norm.weight", None, None),
        ("model.hlayers.3.w", None, None),  # a word ending in 'layers' is no block list
    ],
)
def test_layer_index_and_suffix(name, index, suffix):
    assert layer_index(name) == index
    assert layer_suffix(name) == suffix


def test_with_layer_index_replaces_only_the_block_index():
    assert with_layer_index("model.layers.3.mlp.w", 10) == "model.layers.10.mlp.w"
    assert with_layer_index("transformer.h.1.attn.w", 0) == "transformer.h.0.attn.w"
    assert with_layer_index("model.layers.1.mlp.experts.1.w", 4) == "model.layers.4.mlp.experts.1.w"
    assert with_layer_index("lm_head.weight", 2) == "lm_head.weight"
    assert layer_index(with_layer_index("gpt_neox.layers.0.attention.dense.bias", 9)) == 9


# ---------------------------------------------------------------- hub ids


def unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("offline", ["1", "0"])
def test_hub_hint_says_what_to_do_in_each_mode(tmp_path, offline):
    """A hub id that is neither cached nor a folder: offline, how to allow downloads; online,
    the download error and that the id may be wrong or gated. The hub is a closed localhost
    port, so nothing leaves this machine and the download fails at once."""
    import os
    import subprocess
    import sys
    import time

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": offline,
        "HF_HOME": str(tmp_path / "hf"),  # an empty cache
        "HF_ENDPOINT": f"http://127.0.0.1:{unused_port()}",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    env.pop("HF_TOKEN", None)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "evomerge.cli", "eval", "no-such-org/no-such-model", "--tasks", "t"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("evomerge: error: MODEL_DIR: 'no-such-org/no-such-model' is no local")
    assert str(tmp_path / "no-such-org" / "no-such-model") in line
    if offline == "1":
        assert "downloads are off (HF_HUB_OFFLINE=1): set HF_HUB_OFFLINE=0 to download it" in line
        assert "or run `evomerge fetch STUDY.yaml` where the hub is reachable" in line
    else:
        assert "HF_HUB_OFFLINE" not in line
        assert "could not be downloaded from the hub (LocalEntryNotFoundError: " in line
        assert "Connection refused" in line
        assert "misspelled, or a gated or private repo" in line
    assert seconds < 30, seconds

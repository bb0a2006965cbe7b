"""Broken checkpoints through the real commands: `run`, `merge` and `eval` refuse a truncated or
garbage safetensors file, a broken sharded index, and a config.json that disagrees with its
weights, with one line naming the file (and the field), exit 2, before anything is created."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.checkpoint import CheckpointReader
from evomerge.checkpoint_check import config_mismatch
from evomerge.cli import main
from evomerge.errors import CheckpointError
from evomerge.safetensors_stream import read_header
from tests.study_factory import make_tiny_study

COMMANDS = ("run", "merge", "eval")


@pytest.fixture(scope="module")
def study_template(tmp_path_factory) -> Path:
    """A tiny study (2-layer Llamas, hidden 32, vocab 46) to copy and break."""
    root = tmp_path_factory.mktemp("study")
    make_tiny_study(root)
    return root


@pytest.fixture
def study(study_template, tmp_path) -> Path:
    root = tmp_path / "study"
    shutil.copytree(study_template, root)
    return root


def run_command(command: str, root: Path, capsys) -> tuple[int, str]:
    """One real command over the study's models (s1 is the one the tests break); returns
    (exit code, stderr). Checks that a refused command created nothing."""
    out = root / "out"
    if command == "run":
        argv = ["run", str(root / "study.yaml"), "--runs-dir", str(out), "--quiet"]
    elif command == "merge":
        recipe = {
            "merge_method": "linear",
            "models": [
                {"model": str(root / "models" / m), "parameters": {"weight": 1}}
                for m in ("s1", "s2")
            ],
        }
        (root / "merge.yaml").write_text(yaml.safe_dump(recipe))
        argv = ["merge", str(root / "merge.yaml"), "--out", str(out), "--quiet"]
    else:
        argv = ["eval", str(root / "models" / "s1"), "--tasks", "tiny_search"]
        argv += ["--include-path", str(root / "tasks")]
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    if code == 2:
        assert not out.exists(), f"{command} refused but created {out}"
    return code, err


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evomerge: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def rewrite_header(path: Path, edit: Callable[[dict], None]) -> None:
    """The same tensor data under an edited header (the header's length follows the edit)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])


def last_tensor(header: dict) -> str:
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    return max(tensors, key=lambda k: tensors[k]["data_offsets"][1])


def grow_last_tensor(header: dict) -> None:
    """Doubles the last tensor's first dimension: its offsets now point past the file's end."""
    entry = header[last_tensor(header)]
    begin, end = entry["data_offsets"]
    entry["shape"][0] *= 2
    entry["data_offsets"] = [begin, begin + 2 * (end - begin)]


def shifted(header: dict, by: int) -> list[int]:
    """The last tensor's offsets moved by `by` bytes (same length: overlapping its neighbour)."""
    begin, end = header[last_tensor(header)]["data_offsets"]
    return [begin + by, end + by]


def edit_config(folder: Path, **fields: object) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


# ---------------------------------------------------------------- corrupt safetensors


def truncate_to_70000(w: Path) -> None:
    os.truncate(w, 70000)  # as `truncate -s 70000 model.safetensors`


def truncate_in_header(w: Path) -> None:
    os.truncate(w, 100)


def garbage(w: Path) -> None:
    w.write_bytes(os.urandom(w.stat().st_size))


def garbage_json(w: Path) -> None:
    raw = bytearray(w.read_bytes())
    raw[8:40] = b"\xff" * 32  # a plausible length, then no JSON
    w.write_bytes(bytes(raw))


CORRUPT = {
    "truncated": (truncate_to_70000, "is truncated: its header declares 86144 bytes"),
    "truncated-header": (truncate_in_header, "is truncated or not a safetensors file"),
    "garbage": (garbage, "is not a safetensors file"),
    "garbage-json": (garbage_json, "header is not JSON"),
    "offsets-past-end": (
        lambda w: rewrite_header(w, grow_last_tensor),
        "is truncated: its header declares",
    ),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", list(CORRUPT))
def test_corrupt_safetensors_is_one_line_exit_2(study, capsys, command, kind):
    weights = study / "models" / "s1" / "model.safetensors"
    corrupt, needle = CORRUPT[kind]
    corrupt(weights)
    code, err = run_command(command, study, capsys)
    assert_one_line(code, err, str(weights), needle)


def shard(folder: Path) -> list[Path]:
    """Rewrites the folder's weights as a sharded checkpoint; returns the shards."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    model.save_pretrained(folder, max_shard_size="20KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2
    return shards


@pytest.mark.parametrize("command", COMMANDS)
def test_index_naming_a_missing_shard(study, capsys, command):
    gone = shard(study / "models" / "s1")[1]
    gone.unlink()
    code, err = run_command(command, study, capsys)
    assert_one_line(code, err, f"shard {gone} named in the index is missing")


@pytest.mark.parametrize("command", COMMANDS)
def test_corrupt_index(study, capsys, command):
    folder = study / "models" / "s1"
    shard(folder)
    index = folder / "model.safetensors.index.json"
    index.write_text(index.read_text()[:50])
    code, err = run_command(command, study, capsys)
    assert_one_line(code, err, str(index), "is corrupt")


def test_index_naming_a_tensor_its_shard_lacks(study, capsys):
    folder = study / "models" / "s1"
    shards = shard(folder)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(n for n, f in data["weight_map"].items() if f == shards[0].name)
    data["weight_map"][name] = shards[1].name
    index.write_text(json.dumps(data))
    code, err = run_command("merge", study, capsys)
    assert_one_line(code, err, f"puts tensor {name!r} in {shards[1].name}, which does not hold it")


def test_a_sharded_model_still_runs(study, capsys):
    shard(study / "models" / "s1")
    code, err = run_command("merge", study, capsys)
    assert code == 0, err


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda h: h[last_tensor(h)].update(dtype="F16"), "needs"),  # bytes != shape x dtype
        (lambda h: h[last_tensor(h)].update(data_offsets=shifted(h, -4)), "starts at byte"),
        (lambda h: h[last_tensor(h)].update(shape="x"), "no valid dtype, shape and data_offsets"),
        (lambda h: h.update(extra={"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}), None),
    ],
)
def test_header_checks(study, edit, needle):
    weights = study / "models" / "s1" / "model.safetensors"
    rewrite_header(weights, edit)
    if needle is None:  # an empty tensor is valid, as safetensors has it
        assert "extra" in read_header(weights)
        return
    with pytest.raises(CheckpointError, match=needle):
        read_header(weights)


def test_bytes_after_the_last_tensor(study):
    weights = study / "models" / "s1" / "model.safetensors"
    with open(weights, "ab") as fh:
        fh.write(b"\0" * 16)
    with pytest.raises(CheckpointError, match="16 bytes follow the last tensor"):
        CheckpointReader(weights.parent)


def test_header_is_read_like_safe_open(study):
    from safetensors import safe_open

    weights = study / "models" / "s1" / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        names = list(f.keys())
        want = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in names}
    got = read_header(weights)
    assert list(got) == list(want)
    assert {k: (v.dtype, v.shape) for k, v in got.items()} == want


# ---------------------------------------------------------------- config.json against weights

LLAMA_MISMATCH = {
    "num_hidden_layers": (3, "num_hidden_layers is 3 but the weights hold 2 layers"),
    "hidden_size": (48, "hidden_size is 48 but model.embed_tokens.weight has shape [46, 32]"),
    "vocab_size": (50, "vocab_size is 50 but model.embed_tokens.weight has shape [46, 32]"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("field", list(LLAMA_MISMATCH))
def test_config_that_disagrees_with_the_weights(study, capsys, command, field):
    folder = study / "models" / "s1"
    value, needle = LLAMA_MISMATCH[field]
    edit_config(folder, **{field: value})
    code, err = run_command(command, study, capsys)
    assert_one_line(code, err, f"{folder / 'config.json'} does not match its weights", needle)


def test_a_missing_block_is_named(study, capsys):
    weights = study / "models" / "s1" / "model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(weights)
    save_file({k: v for k, v in state.items() if ".layers.0." not in k}, weights)
    code, err = run_command("merge", study, capsys)
    assert_one_line(code, err, "the weights hold no tensors for layer 0 of 0-1")


def test_tied_llama_passes(tmp_path):
    from transformers import LlamaForCausalLM

    from tests.model_factory import tiny_llama_config

    cfg = tiny_llama_config(layers=2)
    cfg.tie_word_embeddings = True
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tied")
    r = CheckpointReader(tmp_path / "tied")
    assert "lm_head.weight" not in r and r.num_layers == 2


def save_tiny_gpt2(out: Path, seed: int) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=64)
    cfg.bos_token_id = cfg.eos_token_id = 0
    GPT2LMHeadModel(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gpt2")
    return save_tiny_gpt2(root / "a", 0), save_tiny_gpt2(root / "b", 1)


GPT2_MISMATCH = {
    "n_layer": (3, "n_layer is 3 but the weights hold 2 layers"),
    "n_embd": (48, "n_embd is 48 but transformer.wte.weight has shape [64, 32] (32 columns)"),
    "vocab_size": (80, "vocab_size is 80 but transformer.wte.weight has shape [64, 32] (64 rows)"),
}


@pytest.mark.parametrize("field", [None, *GPT2_MISMATCH])
def test_gpt2_merges_and_its_config_is_checked(gpt2_pair, tmp_path, capsys, field):
    a, b = (tmp_path / "a", tmp_path / "b")
    shutil.copytree(gpt2_pair[0], a)
    shutil.copytree(gpt2_pair[1], b)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [{"model": str(m), "parameters": {"weight": 1}} for m in (a, b)],
            }
        )
    )
    if field is not None:
        edit_config(b, **{field: GPT2_MISMATCH[field][0]})
    capsys.readouterr()
    code = main(["merge", str(recipe), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    if field is None:  # tied embeddings, `transformer.h.N` blocks, n_layer/n_embd: all fine
        assert code == 0, err
        assert CheckpointReader(tmp_path / "o").num_layers == 2
        return
    needle = GPT2_MISMATCH[field][1]
    assert_one_line(code, err, f"{b / 'config.json'} does not match its weights", needle)


def save_tiny_llava(out: Path) -> Path:
    """A multimodal checkpoint: its config's layer count and widths live in `text_config`, and
    its vision tower has 3 blocks against the language model's 2."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from tests.model_factory import tiny_llama_config

    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
    )
    cfg = LlavaConfig(text_config=tiny_llama_config(layers=2), vision_config=vision)
    cfg.image_token_index = 63
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(out)
    return out


def test_text_config_is_checked_against_the_language_model(tmp_path):
    folder = save_tiny_llava(tmp_path / "llava")
    CheckpointReader(folder)  # the vision tower's 3 blocks are not the text model's
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"text_config\.num_hidden_layers is 3 but the weights hold 2"
    ):
        CheckpointReader(folder)


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({}, None),  # no config: nothing to compare
        ({"num_hidden_layers": None, "vocab_size": "x"}, None),  # no integer: not checked
        ({"num_hidden_layers": 2, "is_encoder_decoder": True}, None),
        ({"num_hidden_layers": 1, "num_nextn_predict_layers": 1}, None),  # DeepSeek MTP block
        ({"n_layer": 2, "num_hidden_layers": 3}, "num_hidden_layers is 3"),  # first field wins
        ({"padded_vocab_size": 10, "vocab_size": 8}, None),  # chatglm: the padded one is used
        ({"hidden_size": 64, "word_embed_proj_dim": 4}, None),  # OPT: the projection's width
    ],
)
def test_config_fields(config, problem):
    shapes = {"m.layers.0.w": (4, 4), "m.layers.1.w": (4, 4), "m.embed_tokens.weight": (10, 4)}
    layers = {n: (int(n.split(".")[2]) if ".layers." in n else None) for n in shapes}
    got = config_mismatch(config, shapes, layers)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got

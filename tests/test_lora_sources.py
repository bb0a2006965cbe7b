"""LoRA adapters as sources: a PEFT adapter folder, or mergekit's `base+adapter`, is the model
peft's `merge_and_unload` gives (W + scale * B A), tensor by tensor, in merges and in a study.

The adapter is made here with peft: ranks and alphas per module (rank_pattern, alpha_pattern),
rsLoRA scaling, an adapted embedding, and random B (peft starts B at zero, which would hide the
product).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.checkpoint import CheckpointReader
from evomerge.cli import main
from evomerge.errors import ConfigError, UnsafeCheckpointError
from tests.model_factory import save_tiny_llama
from tests.study_factory import save_tokenizer, write_task

pytest.importorskip("peft", reason="peft (the dev extra) makes the reference adapters")


def make_adapter(base: Path, out: Path, *, safe: bool = True) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 3},
        use_rslora=True,
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.save_pretrained(out, safe_serialization=safe)
    return out


def peft_merged(base: Path, adapter: Path, out: Path) -> Path:
    """The reference: peft's merge_and_unload of the adapter into its base, saved."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    save_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    base = save_tiny_llama(root / "base", seed=0, layers=2, vocab=46)
    save_tokenizer(base)
    s1 = save_tiny_llama(root / "s1", seed=1, base=base, noise=0.05)
    save_tokenizer(s1)
    adapter = make_adapter(base, root / "adapter")
    ref = peft_merged(base, adapter, root / "peft_merged")
    return {"root": root, "base": base, "s1": s1, "adapter": adapter, "ref": ref}


def test_the_adapter_reads_as_peft_merge_and_unload(lora):
    want = load_file(lora["ref"] / "model.safetensors")
    cfg = json.loads((lora["adapter"] / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(lora["base"])  # how the folder finds its base
    for ref in (str(lora["adapter"]), f"{lora['base']}+{lora['adapter']}"):
        reader = CheckpointReader(ref)
        assert reader.names() == list(load_file(lora["base"] / "model.safetensors"))
        assert set(reader.names()) == set(want)
        changed = 0
        for name, w in want.items():
            got = reader.get(name)
            assert got.shape == w.shape and got.dtype == w.dtype, name
            torch.testing.assert_close(got, w, rtol=0, atol=1e-6)
            changed += not torch.equal(w, load_file(lora["base"] / "model.safetensors")[name])
        assert changed == 2 * 3 + 1  # q, v, down in 2 layers and the embeddings
        assert reader.location == f"{lora['base']}+{lora['adapter']}"


def test_merging_a_lora_equals_merging_peft_merged_model(lora, tmp_path):
    """mergekit's syntax in a mergekit YAML; the same merge over peft's merged folder."""

    def config(model: str) -> dict:
        return {
            "merge_method": "ties",
            "base_model": str(lora["base"]),
            "models": [
                {"model": model, "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": str(lora["s1"]), "parameters": {"weight": 0.4, "density": 0.7}},
            ],
            "dtype": "float32",
        }

    outs = {}
    for label, model in (
        ("lora", f"{lora['base']}+{lora['adapter']}"),
        ("mapping", {"model": str(lora["base"]), "lora": str(lora["adapter"])}),
        ("ref", str(lora["ref"])),
    ):
        path = tmp_path / f"{label}.yaml"
        path.write_text(yaml.safe_dump(config(model)))  # type: ignore[arg-type]
        assert main(["merge", str(path), "--out", str(tmp_path / label), "--quiet"]) == 0
        outs[label] = load_file(tmp_path / label / "model.safetensors")
    for label in ("lora", "mapping"):
        assert outs[label].keys() == outs["ref"].keys()
        for name, w in outs["ref"].items():
            torch.testing.assert_close(outs[label][name], w, rtol=0, atol=1e-5)


def test_pickled_adapter_weights_need_allow_pickle(lora, tmp_path, capsys):
    pickled = make_adapter(lora["base"], tmp_path / "pickled", safe=False)
    assert (pickled / "adapter_model.bin").exists()
    assert not (pickled / "adapter_model.safetensors").exists()
    with pytest.raises(UnsafeCheckpointError, match="--allow-pickle"):
        CheckpointReader(pickled)
    reader = CheckpointReader(pickled, allow_pickle=True)
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(
        reader.get(name), load_file(lora["ref"] / "model.safetensors")[name], rtol=0, atol=1e-6
    )


def test_variants_with_another_equation_are_refused_in_one_line(lora, tmp_path):
    dora = tmp_path / "dora"
    shutil.copytree(lora["adapter"], dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ConfigError, match="uses use_dora, which merges by another equation"):
        CheckpointReader(dora)
    with pytest.raises(ConfigError, match="is not BASE\\+ADAPTER"):
        CheckpointReader(f"{lora['base']}+{lora['adapter']}+x")


def test_a_study_with_a_lora_source_runs(lora, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks, "tiny_search", seed=1, n=6)
    study = {
        "name": "lora",
        "models": {
            "base": str(lora["base"]),
            "sources": [
                {"name": "adapted", "path": str(lora["adapter"])},
                {"name": "s1", "path": str(lora["s1"])},
            ],
        },
        "search_space": {"preset": "linear", "granularity": 1},
        "tasks": {"include_path": [str(tasks)], "search": ["tiny_search"], "batch_size": 8},
        "optimizer": {"name": "cma", "popsize": 3, "sigma0": 0.3},
        "budget": {"max_trials": 3},
        "device": "cpu",
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 0
    run = tmp_path / "runs" / "lora"
    lines = [json.loads(x) for x in (run / "trials.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(x["status"] in ("ok", "duplicate") for x in lines), lines
    resolved = yaml.safe_load((run / "study.yaml").read_text())
    assert resolved["models"]["sources"][0]["path"] == str(lora["adapter"])
    best = yaml.safe_load((run / "best" / "recipe.yaml").read_text())
    assert best["models"]["adapted"] == f"{lora['base']}+{lora['adapter']}"


def test_gpt2_conv1d_and_modules_to_save_read_as_peft_merges_them(tmp_path):
    """GPT-2 stores Conv1D weights as (in, out): peft's fan_in_fan_out transposes B A; a
    module in modules_to_save is saved whole and replaces the base's."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=32, vocab_size=50)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    lora_cfg = LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=["ln_f"]
    )
    peft_model = get_peft_model(model, lora_cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    base = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    merged = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    want = {k: v for k, v in merged.state_dict().items() if k != "lm_head.weight"}  # tied
    reader = CheckpointReader(tmp_path / "adapter")
    assert set(want) <= set(reader.names())
    stored = load_file(tmp_path / "base" / "model.safetensors")
    changed = [n for n in want if not torch.equal(want[n], stored[n])]
    assert sorted(changed) == sorted(
        [f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)]
        + ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    )
    for name, w in want.items():
        torch.testing.assert_close(reader.get(name), w, rtol=0, atol=1e-6)

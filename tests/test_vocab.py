"""Sources whose vocabularies differ (tokens added by fine-tunes), as mergekit 0.1.5 merges them.

Fine-tunes of one tiny Llama add chat markers or a tool token (`resize_token_embeddings`, their
tokenizers saying so). The same configs run through `mergekit-yaml` and `evomerge merge` for
`tokenizer_source: base | union | <model>`; rows are compared token by token (mergekit orders a
union's new tokens by a set's iteration order, which changes with the hash seed), and the
exported tokenizer is the chosen source's, chat template included. A study with `models.
tokenizer_source` scores its live model, whose embeddings have the output vocabulary's rows.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.errors import IncompatibleModelsError
from tests.model_factory import save_tiny_llama
from tests.study_factory import save_tokenizer, write_task

CHAT = ["<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
needs_mergekit = pytest.mark.skipif(
    importlib.util.find_spec("mergekit") is None, reason="mergekit extra not installed"
)


def fine_tune(base: Path, out: Path, seed: int, tokens: list[str], *, special: bool) -> Path:
    """A noisy copy of `base` whose tokenizer adds `tokens`, with random rows for them."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    save_tiny_llama(out, seed=seed, base=base, noise=0.05)
    tok = AutoTokenizer.from_pretrained(base)
    if special:
        tok.add_special_tokens({"additional_special_tokens": tokens})
        tok.chat_template = TEMPLATE
    else:
        tok.add_tokens(tokens)
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
            emb.weight[old:] = torch.randn(emb.weight[old:].shape, generator=g) * 0.1
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory) -> Path:
    """base (46 tokens); chat and chat2 (+2 chat markers: 48 rows); tools (+1 token: 47)."""
    root = tmp_path_factory.mktemp("vocab")
    base = save_tiny_llama(root / "base", seed=0, layers=2, vocab=46)
    save_tokenizer(base)
    fine_tune(base, root / "chat", 1, CHAT, special=True)
    fine_tune(base, root / "chat2", 2, CHAT, special=True)
    fine_tune(base, root / "tools", 3, ["<tool>"], special=False)
    return root


def configs() -> dict[str, dict]:
    def ta(source: str, *models: str, method: str = "task_arithmetic", **params) -> dict:
        return {
            "merge_method": method,
            "base_model": "base",
            "models": [
                {"model": m, "parameters": {"weight": 0.4 + 0.1 * i, **params}}
                for i, m in enumerate(models)
            ],
            "tokenizer_source": source,
            "dtype": "float32",
        }

    linear = {
        "merge_method": "linear",
        "models": [
            {"model": m, "parameters": {"weight": w}}
            for m, w in (("chat", 0.5), ("chat2", 0.3), ("tools", 0.2))
        ],
        "tokenizer_source": "union",
        "dtype": "float32",
    }
    return {
        "base": ta("base", "chat", "tools"),
        "union": ta("union", "chat", "tools", "chat2", method="ties", density=0.6),
        "model": ta("chat", "chat", "tools"),
        "union_linear": linear,  # no base: a token two models have gets their mean
        "union_padded": {  # 49 tokens in 56 rows: the padding rows are the token rows' mean
            **{k: v for k, v in ta("union", "chat", "tools").items() if k != "tokenizer_source"},
            "tokenizer": {"source": "union", "pad_to_multiple_of": 8},
        },
    }


DRIVER = """
import sys
from mergekit.scripts.run_yaml import main
for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
    main([cfg, out, "--quiet", "--no-write-model-card"], standalone_mode=False)
"""


@pytest.fixture(scope="module")
def mergekit_outputs(vocab_models) -> Path:
    argv = []
    for name, cfg in configs().items():
        (vocab_models / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        argv += [f"{name}.yaml", f"mk-{name}"]
    subprocess.run(
        [sys.executable, "-c", DRIVER, *argv], check=True, capture_output=True, cwd=vocab_models
    )
    return vocab_models


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def vocab_of(path: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).get_vocab()


def added_tokens(path: Path) -> dict[str, bool]:
    """Added token -> whether it is special, from a saved tokenizer."""
    from transformers import AutoTokenizer

    decoder = AutoTokenizer.from_pretrained(path).added_tokens_decoder
    return {t.content: t.special for t in decoder.values()}


VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@needs_mergekit
@pytest.mark.mergekit
@pytest.mark.parametrize("name", list(configs()))
def test_same_rows_per_token_as_mergekit_yaml(mergekit_outputs, name, monkeypatch):
    root = mergekit_outputs
    monkeypatch.chdir(root)
    out = root / f"ev-{name}"
    assert main(["merge", f"{name}.yaml", "--out", str(out), "--quiet"]) == 0
    ours, theirs = load_dir(out), load_dir(root / f"mk-{name}")
    v_ours, v_theirs = vocab_of(out), vocab_of(root / f"mk-{name}")
    assert v_ours.keys() == v_theirs.keys()
    if name in ("base", "model"):  # one tokenizer's vocabulary: the same ids as mergekit's
        assert v_ours == v_theirs
    assert added_tokens(out) == added_tokens(root / f"mk-{name}")  # special or not, as mergekit
    assert ours.keys() == theirs.keys()
    tokens = len(v_theirs)
    rows = 56 if name == "union_padded" else tokens
    for t in VOCAB_TENSORS:
        assert ours[t].shape == theirs[t].shape == (rows, 32)
    order_ours = torch.tensor([v_ours[t] for t in v_theirs])
    order_theirs = torch.tensor(list(v_theirs.values()))
    worst = 0.0
    for t, ref in theirs.items():
        got = ours[t]
        if t in VOCAB_TENSORS:  # token rows by token, then the padding rows (a mean: no order)
            got = torch.cat([got[order_ours], got[tokens:]])
            ref = torch.cat([ref[order_theirs], ref[tokens:]])
        worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
    assert worst <= 1e-5, f"{name}: max relative error {worst:.2e}"
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["vocab_size"]
        == rows
        == json.loads((root / f"mk-{name}" / "config.json").read_text())["vocab_size"]
    )


def embed(folder: Path) -> dict[str, torch.Tensor]:
    """Token -> its embedding row in a checkpoint folder."""
    rows = load_dir(folder)["model.embed_tokens.weight"]
    return {t: rows[i] for t, i in vocab_of(folder).items()}


def test_rows_follow_mergekit_fill_rules(vocab_models, tmp_path):
    """Independent of mergekit: a model's own rows for its tokens; a token only one model has,
    that model's row; one the base lacks and two models have, their mean."""
    models = ("base", "chat", "chat2", "tools")

    def merge_with(weights: dict[str, float]) -> dict[str, torch.Tensor]:
        recipe = {
            "evomerge_recipe": 1,
            "models": {m: str(vocab_models / m) for m in models},
            "base_model": "base",
            "tokenizer_source": "union",
            "sections": [
                {"method": "linear", "models": {m: {"weight": w} for m, w in weights.items()}}
            ],
        }
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        assert main(["merge", str(path), "--out", str(out), "--quiet"]) == 0
        return embed(out)

    src = {m: embed(vocab_models / m) for m in models}
    only_chat = merge_with({"chat": 1.0, "chat2": 0.0, "tools": 0.0})
    assert len(only_chat) == 49
    for t in ("w3", *CHAT):  # linear weight 1 on chat: chat's own rows
        torch.testing.assert_close(only_chat[t], src["chat"][t])
    torch.testing.assert_close(only_chat["<tool>"], src["tools"]["<tool>"])  # only tools has it
    only_tools = merge_with({"chat": 0.0, "chat2": 0.0, "tools": 1.0})
    for t in CHAT:  # tools lacks the chat markers, chat and chat2 have them, the base does not
        torch.testing.assert_close(only_tools[t], (src["chat"][t] + src["chat2"][t]) / 2)
    torch.testing.assert_close(only_tools["w3"], src["tools"]["w3"])


def test_output_tokenizer_and_chat_template_are_the_sources(vocab_models, tmp_path):
    from transformers import AutoTokenizer

    recipe = {
        "evomerge_recipe": 1,
        "models": {m: str(vocab_models / m) for m in ("base", "chat", "tools")},
        "base_model": "base",
        "tokenizer_source": "chat",
        "sections": [
            {
                "method": "task_arithmetic",
                "models": {"chat": {"weight": 0.5}, "tools": {"weight": 0.5}},
            }
        ],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    chat = AutoTokenizer.from_pretrained(vocab_models / "chat")
    assert tok.get_vocab() == chat.get_vocab()
    assert tok.chat_template == chat.chat_template == TEMPLATE
    assert tok.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False) == (
        "<|im_start|>w1<|im_end|>"
    )


def test_without_a_tokenizer_source_different_rows_are_a_shape_error(vocab_models, tmp_path):
    recipe = {
        "evomerge_recipe": 1,
        "models": {m: str(vocab_models / m) for m in ("base", "chat")},
        "base_model": "base",
        "sections": [{"method": "task_arithmetic", "models": {"chat": {"weight": 0.5}}}],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    from evomerge.merge import MergeSettings, merge_to_disk
    from evomerge.recipe_loader import load_recipe_file

    with pytest.raises(
        IncompatibleModelsError,
        match=r"shape \[46, 32\] in 'base' but \[48, 32\] in 'chat'; if tokens were added, set tokenizer_source",
    ):
        merge_to_disk(load_recipe_file(path), MergeSettings(out_dir=tmp_path / "o", progress=False))


def test_a_hidden_size_that_differs_is_refused_in_one_line(vocab_models, tmp_path, capsys):
    wide = save_tiny_llama(tmp_path / "wide", seed=5, layers=2, vocab=46, hidden=48)
    save_tokenizer(wide)
    recipe = {
        "evomerge_recipe": 1,
        "models": {
            "base": str(vocab_models / "base"),
            "chat": str(vocab_models / "chat"),
            "wide": str(wide),
        },
        "base_model": "base",
        "tokenizer_source": "union",
        "sections": [
            {
                "method": "task_arithmetic",
                "models": {"chat": {"weight": 0.5}, "wide": {"weight": 0.5}},
            }
        ],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    assert main(["merge", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("evomerge: error: ") and "differ (hidden size)" in line, line


def test_a_study_scores_a_live_model_in_the_output_vocabulary(vocab_models, tmp_path):
    """models.tokenizer_source: union: the worker's live model has 49 rows and the union
    tokenizer; a candidate merged in place equals `evomerge merge` of the same recipe."""
    from evomerge.config import load_study_config
    from evomerge.study_plan import build_plan
    from evomerge.worker import Worker

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks, "tiny_search", seed=1, n=6)
    study = {
        "name": "vocab",
        "models": {
            "base": str(vocab_models / "base"),
            "sources": [
                {"name": "chat", "path": str(vocab_models / "chat")},
                {"name": "tools", "path": str(vocab_models / "tools")},
            ],
            "tokenizer_source": "union",
        },
        "search_space": {"preset": "task_arithmetic", "granularity": 1},
        "tasks": {"include_path": [str(tasks)], "search": ["tiny_search"], "batch_size": 8},
        "optimizer": {"name": "cma", "popsize": 3, "sigma0": 0.3},
        "budget": {"max_trials": 3},
        "device": "cpu",
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    config = load_study_config(path)
    plan = build_plan(config)
    worker = Worker(plan.worker_spec)
    assert worker.model.get_input_embeddings().weight.shape == (48 + 1, 32)
    assert worker.model.get_output_embeddings().weight.shape == (49, 32)
    assert set(CHAT) | {"<tool>"} <= worker.tokenizer.get_vocab().keys()
    recipe = plan.space.decode(plan.x0)
    assert recipe.tokenizer_source == "union"
    assert worker.evaluate(recipe).error is None
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(recipe.to_yaml())
    assert main(["merge", str(recipe_path), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    disk = load_dir(tmp_path / "m")
    live = worker.model.state_dict()
    for name in VOCAB_TENSORS:
        torch.testing.assert_close(live[name], disk[name], rtol=0, atol=1e-6)
    assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--quiet"]) == 0
    trials = (tmp_path / "runs" / "vocab" / "trials.jsonl").read_text().splitlines()
    lines = [json.loads(x) for x in trials]
    assert len(lines) == 3 and all(x["status"] in ("ok", "duplicate") for x in lines)
    from transformers import AutoModelForCausalLM

    from evomerge.export import export_run

    result = export_run(tmp_path / "runs" / "vocab", tmp_path / "export", report=False)
    assert result.mergekit_written
    written = yaml.safe_load((tmp_path / "export" / "mergekit.yaml").read_text())
    assert written["tokenizer_source"] == "union"
    assert vocab_of(tmp_path / "export") == worker.tokenizer.get_vocab()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert model.get_input_embeddings().weight.shape == (49, 32)


def test_a_written_mergekit_config_keeps_the_tokenizer_source(vocab_models):
    """Read a mergekit YAML, write it back (export's path): tokenizer_source and padding stay."""
    from evomerge.export import mergekit_config
    from evomerge.mergekit_read import read_mergekit

    for name in ("union", "model", "union_padded"):
        data = configs()[name]
        data = {**data, "base_model": str(vocab_models / "base")}
        data["models"] = [{**m, "model": str(vocab_models / m["model"])} for m in data["models"]]
        if data.get("tokenizer_source") not in (None, "base", "union"):
            data["tokenizer_source"] = str(vocab_models / data["tokenizer_source"])
        recipe = read_mergekit(data, where="cfg").recipe
        text, reason = mergekit_config(recipe)
        assert reason is None and text is not None
        again = read_mergekit(yaml.safe_load(text), where="written").recipe
        source = again.tokenizer_source
        assert (again.models.get(source, source), again.pad_to_multiple_of) == (
            recipe.models.get(recipe.tokenizer_source, recipe.tokenizer_source),
            recipe.pad_to_multiple_of,
        )

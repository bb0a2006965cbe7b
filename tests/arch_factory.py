"""Tiny random checkpoints of the common decoder architectures, saved as transformers saves them.

Each architecture is a transformers config (2 layers, hidden 32) and the features it stands for
(tied embeddings, GQA, biases, fused QKV, Conv1D, MoE experts, a sharded index). A family is a
random base plus fine-tunes that differ from it by seeded noise, as tests/model_factory.py makes
them, each folder with the word-level tokenizer of tests/study_factory.py.

MoE: transformers 5 keeps a layer's experts fused in memory (`mlp.experts.gate_up_proj`, 3-D) and
splits them into one tensor per expert on save (`...experts.0.w1.weight`), the layout of the
hub's checkpoints. mergekit 0.1.5's architecture files name the fused tensors, so `fused=True`
writes the in-memory state dict as it is: the layout mergekit merges.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tests.study_factory import save_tokenizer

VOCAB = 46  # the tokenizer of study_factory: <unk> <pad> <s> </s>, 40 words, Q: A:
BYTE_VOCAB = 264  # save_byte_level_tokenizer: the 4 specials, 256 bytes, merges up to 264
TOKENS = {"pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 3}
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2}  # GQA: 2 query heads per kv head


@dataclass(frozen=True)
class Arch:
    """One architecture under test: how to build its config, and what it exercises."""

    name: str
    config: Callable[[], Any]
    features: tuple[str, ...]
    sharded: bool = False  # saved in shards with model.safetensors.index.json
    fused: bool = False  # MoE experts written fused (mergekit's layout), not per expert
    # how mergekit 0.1.5 merges it: "same" (these tensors), "fused" (converted to transformers'
    # in-memory layout first, and written so), "none" (it refuses these checkpoints)
    mergekit: str = "same"
    # AutoTokenizer forces some model types' own tokenizer class (qwen2: Qwen2Tokenizer, a
    # byte-level BPE) over the saved one, which then encodes a word-level vocabulary to nothing
    byte_level: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _cfg(cls_name: str, **kw: Any) -> Callable[[], Any]:
    def make() -> Any:
        import transformers

        return getattr(transformers, cls_name)(**{"vocab_size": VOCAB, **TOKENS, **kw})

    return make


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        Arch("llama", _cfg("LlamaConfig", **SMALL, **HEADS, tie_word_embeddings=False),
             ("untied", "GQA")),
        Arch("mistral", _cfg("MistralConfig", **SMALL, **HEADS, tie_word_embeddings=False),
             ("untied", "GQA", "sharded"), sharded=True),
        Arch("qwen2", _cfg("Qwen2Config", **SMALL, **HEADS, tie_word_embeddings=True,
                           vocab_size=BYTE_VOCAB),
             ("tied", "GQA", "qkv biases", "byte-level BPE tokenizer"), byte_level=True),
        Arch("qwen3", _cfg("Qwen3Config", **SMALL, **HEADS, head_dim=8, tie_word_embeddings=False),
             ("untied", "GQA", "q/k norms")),
        Arch("gemma2", _cfg("Gemma2Config", **SMALL, **HEADS, head_dim=8, tie_word_embeddings=True),
             ("tied", "GQA", "4 norms per block")),
        Arch("phi3", _cfg("Phi3Config", **SMALL, **HEADS, tie_word_embeddings=False),
             ("untied", "fused qkv_proj and gate_up_proj")),
        Arch("gpt2", _cfg("GPT2Config", n_embd=32, n_layer=2, n_head=4, n_positions=64),
             ("tied", "Conv1D", "biases", "h.N. names")),
        Arch("gpt_neox", _cfg("GPTNeoXConfig", **SMALL, num_attention_heads=4,
                              tie_word_embeddings=False),
             ("untied embed_out", "fused query_key_value", "biases"), mergekit="none"),
        Arch("olmo2", _cfg("Olmo2Config", **SMALL, **HEADS, tie_word_embeddings=False),
             ("untied", "GQA", "q/k norms")),
        Arch("mixtral", _cfg("MixtralConfig", **SMALL, **HEADS, num_local_experts=4,
                             num_experts_per_tok=2, tie_word_embeddings=False),
             ("MoE, experts per tensor (transformers' saved layout)",), mergekit="fused"),
        Arch("mixtral_fused", _cfg("MixtralConfig", **SMALL, **HEADS, num_local_experts=4,
                                   num_experts_per_tok=2, tie_word_embeddings=False),
             ("MoE, fused 3-D experts (mergekit's layout)",), fused=True),
        Arch("qwen3_moe", _cfg("Qwen3MoeConfig", **SMALL, **HEADS, head_dim=8,
                               moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                               decoder_sparse_step=1, tie_word_embeddings=False),
             ("MoE, experts per tensor", "q/k norms"), mergekit="fused"),
    ]
}  # fmt: skip


def _save(model: torch.nn.Module, out: Path, arch: Arch) -> None:
    if arch.fused:  # the in-memory state dict as it is, which mergekit's architecture file names
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        model.config.architectures = [type(model).__name__]  # save_pretrained sets it
        model.config.save_pretrained(out)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
    elif arch.sharded:
        model.save_pretrained(out, max_shard_size="40KB")
    else:
        model.save_pretrained(out)
    if arch.byte_level:
        save_byte_level_tokenizer(out)
    else:
        save_tokenizer(out)


def save_byte_level_tokenizer(out: Path) -> None:
    """A byte-level BPE over study_factory's words (GPT-2's scheme), the specials first, as
    study_factory's word-level tokenizer has them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.study_factory import WORDS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BYTE_VOCAB,
        special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" ".join([*WORDS, "Q:", "A:"])] * 3, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    ).save_pretrained(out)


def save_arch_model(
    arch: Arch, out: Path, *, seed: int = 0, base: Path | None = None, noise: float = 0.05
) -> Path:
    """A random model of `arch`; with `base`, that model plus seeded Gaussian noise."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if base is None:
        model = AutoModelForCausalLM.from_config(arch.config())
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():  # a tied head is one parameter with the embedding
                p.add_(torch.randn(p.shape, generator=g) * noise)
    _save(model.float(), out, arch)
    return out


def save_family(arch: Arch, root: Path, sources: int = 3, seed: int = 0) -> dict[str, Path]:
    """root/base and root/s1..sN: a base and N fine-tunes of it."""
    base = save_arch_model(arch, root / "base", seed=seed)
    fam = {"base": base}
    for i in range(1, sources + 1):
        fam[f"s{i}"] = save_arch_model(arch, root / f"s{i}", seed=seed + i, base=base)
    return fam


def disk_names(folder: Path) -> list[str]:
    """Tensor names as written (every shard)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    names: list[str] = []
    for f in files:
        with safe_open(str(folder / f), "pt") as h:
            names += list(h.keys())
    return names

"""Tiny Llama checkpoints for tests: a random base and fine-tunes that differ from it by noise."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama_config(layers: int = 4, hidden: int = 32, vocab: int = 64):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def save_tiny_llama(
    out: Path,
    *,
    seed: int = 0,
    base: Path | None = None,
    noise: float = 0.02,
    dtype: torch.dtype = torch.float32,
    layers: int = 4,
    hidden: int = 32,
    vocab: int = 64,
) -> Path:
    """A random tiny Llama; with `base`, that model plus seeded Gaussian noise (a 'fine-tune')."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    if base is None:
        model = LlamaForCausalLM(tiny_llama_config(layers, hidden, vocab))
    else:
        model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * noise)
    model = model.to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    return out

"""Seeded, deterministic CPU training of the zoo's tiny Llama models.

Bit-identical reruns need: the same seed for weights and data, deterministic kernels and a fixed
intra-op thread count (a float sum split over a different number of threads rounds differently).
`deterministic()` sets both and puts the caller's settings back afterwards.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from evomerge.zoo.tokenizer import BOS, EOS, PAD, VOCAB

_INDEX = {tok: i for i, tok in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID = _INDEX[PAD], _INDEX[BOS], _INDEX[EOS]
TRAIN_THREADS = 1


@dataclass(frozen=True)
class ModelShape:
    """Size of the tiny Llama. Small on purpose: it must train in minutes on two CPU cores."""

    hidden: int = 64
    layers: int = 4
    heads: int = 4
    intermediate: int = 256
    max_positions: int = 64  # longest line is ~28 characters


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float
    batch_size: int = 64
    warmup: int = 20
    weight_decay: float = 0.0
    answer_only: bool = False  # loss on the answer (+ newline) only, not on the prompt
    freeze_embeddings: bool = False  # keep embed_tokens and lm_head fixed (smaller task vectors)
    train_only: tuple[str, ...] = ()  # if set, train only parameters whose name contains one
    pack: int = 0  # if > 0: rows of this many tokens, each filled with whole examples
    seed: int = 0


def encode(text: str) -> list[int]:
    """Token ids of `text`, identical to the zoo tokenizer's (one id per character)."""
    unk = _INDEX["<unk>"]
    return [_INDEX.get(c, unk) for c in text]


def new_model(shape: ModelShape, seed: int) -> torch.nn.Module:
    """A freshly initialised LlamaForCausalLM of `shape`, weights drawn from `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@contextlib.contextmanager
def deterministic(threads: int = TRAIN_THREADS) -> Iterator[None]:
    """Deterministic kernels and a fixed thread count inside; the caller's settings after."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


def make_batch(
    examples: list[tuple[str, str]], answer_only: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of shape (B, T), one example per row, right-padded.

    Each row is `prompt + answer + "\\n"` with no BOS, exactly what lm-eval feeds at evaluation.
    """
    rows, masks = [], []
    for prompt, answer in examples:
        p, a = encode(prompt), encode(answer + "\n")
        rows.append(p + a)
        masks.append([not answer_only] * len(p) + [True] * len(a))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(
            [t if keep else -100 for t, keep in zip(r, m, strict=True)]
        )
    return ids, labels


def packed_batch(
    example_fn: Callable[[random.Random], tuple[str, str]],
    rng: random.Random,
    rows: int,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of shape (rows, width): whole examples back to back, loss on all.

    Each row starts with a fresh example at position 0 (as at evaluation); the rest of the row
    holds further examples, separated by their newlines, so little compute goes to padding.
    """
    ids = torch.full((rows, width), PAD_ID, dtype=torch.long)
    for r in range(rows):
        row: list[int] = []
        while True:
            prompt, answer = example_fn(rng)
            toks = encode(prompt + answer + "\n")
            if row and len(row) + len(toks) > width:
                break
            row.extend(toks[:width])
        ids[r, : len(row)] = torch.tensor(row[:width])
    labels = torch.where(ids == PAD_ID, -100, ids)
    return ids, labels


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(
    model: torch.nn.Module,
    example_fn: Callable[[random.Random], tuple[str, str]],
    cfg: TrainConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train `model` in place on examples drawn from `example_fn`; returns the loss per step."""
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
        model.get_output_embeddings().weight.requires_grad_(False)
    if cfg.train_only:
        for name, p in model.named_parameters():
            if not any(part in name for part in cfg.train_only):
                p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    losses: list[float] = []
    model.train()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        if cfg.pack:
            ids, labels = packed_batch(example_fn, rng, cfg.batch_size, cfg.pack)
        else:
            examples = [example_fn(rng) for _ in range(cfg.batch_size)]
            ids, labels = make_batch(examples, cfg.answer_only)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return losses

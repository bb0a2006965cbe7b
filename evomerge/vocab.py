"""Sources with different vocabularies, re-laid out in one output vocabulary as mergekit does.

A fine-tune that added tokens (chat markers) has more embedding and lm_head rows than its base.
With `tokenizer_source: base | union | <model>` mergekit 0.1.5 (mergekit/tokenizer/build.py and
embed.py) builds one output tokenizer and rebuilds every model's token-indexed tensors for it
before the merge method runs: row j of model m is m's row for output token j; a token m lacks
gets, from the models merged into that tensor, the one model's row that has it, else the base's,
else the mean of those that have it (zeros if none has it). The method then merges tensors of
equal shape. Here that rework is a view over each model's reader (`RemappedReader`), so planning,
the disk merge and the resident search run unchanged on tensors of the output vocabulary's shape.

When every model already has the output vocabulary, in order, one row per token, nothing is
re-laid out (`remap_readers` returns the readers as they are), which is the same arithmetic.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from evomerge.checkpoint import SIDE_FILES, CheckpointReader, layer_index, stored_float_dtype
from evomerge.errors import ConfigError, IncompatibleModelsError

KEYWORDS = ("base", "union")  # beside a model's name, what `tokenizer_source` may say
# The files of a tokenizer: replaced by the output tokenizer's own when the vocabulary is rebuilt.
TOKENIZER_FILES = tuple(n for n in SIDE_FILES if n not in ("config.json", "generation_config.json"))


class NoTokenizerError(ConfigError):
    """The tokenizer the output vocabulary is built from does not load."""


def load_tokenizer(path: Path) -> Any | None:
    """The fast tokenizer of a folder as mergekit loads it; None when it has none that loads
    (mergekit then assumes the base's vocabulary)."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception:  # mergekit: "Unable to load tokenizer ... Assuming same as base"
        return None


def vocab_rows(reader: CheckpointReader) -> int | None:
    """The embedding rows a model has for tokens: config.json's vocab_size, as mergekit reads it."""
    cfg = reader.config
    n = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    return n if isinstance(n, int) else None


def vocab_tensor_names(reader: CheckpointReader) -> list[str]:
    """The token-indexed tensors (rows = tokens): the input and output embeddings of the
    architecture, found as mergekit finds them (a model built on the meta device from
    config.json); tensors outside the blocks with vocab_size rows when it cannot be built."""
    names: list[str] = []
    try:
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(str(reader.path))
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        ids = set()
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            for p in (getattr(module, "weight", None), getattr(module, "bias", None)):
                if p is not None:
                    ids.add(id(p))
        names = [
            n
            for n, p in model.named_parameters(remove_duplicate=False)
            if id(p) in ids and n in reader.infos
        ]
    except Exception:  # an architecture transformers cannot build: the shapes decide
        names = []
    if names:
        return names
    rows = vocab_rows(reader)
    return [
        n
        for n, i in reader.infos.items()
        if layer_index(n) is None and i.shape and rows is not None and i.shape[0] == rows
    ]


@dataclass
class VocabRemap:
    """Every model's rows in the output vocabulary: `index[m][j]` is m's row for output token
    j (-1: m lacks it); `fill(name)` the models whose rows fill a missing token of tensor
    `name` (those merged into it); `rows` the output rows (tokens, then any padding)."""

    tokenizer: Any
    rows: int
    index: dict[str, torch.Tensor]
    names: frozenset[str]
    fill: Callable[[str], Sequence[str]]
    base: str | None
    readers: Mapping[str, CheckpointReader]
    _defaults: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def defaults(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids some model lacks, their fill rows in float32) for tensor `name`; computed
        once from the fill models' rows (mergekit's PermutedVocabulary.assign_embedding_sources)."""
        if name not in self._defaults:
            models = [m for m in self.fill(name) if m in self.index and name in self.readers[m]]
            models = models or [m for m in self.index if name in self.readers[m]]
            present = torch.stack([self.index[m] >= 0 for m in models])  # (M, tokens)
            need = (~present).any(0).nonzero().flatten()
            rows = None
            total = None
            count = present[:, need].sum(0)
            for k, m in enumerate(models):
                t = self.readers[m].get(name, dtype=torch.float32)
                has = present[k, need]
                got = t[self.index[m][need].clamp_min(0)] * has.view(-1, *[1] * (t.dim() - 1))
                total = got if total is None else total + got
                if m == self.base:
                    rows = (got, has)
            assert total is not None
            shape = (-1, *[1] * (total.dim() - 1))
            fill = total / count.clamp_min(1).view(shape)
            if rows is not None:  # the base's own row where the base has the token (and others do)
                fill = torch.where((rows[1] & (count > 1)).view(shape), rows[0], fill)
            self._defaults[name] = (need, fill)
        return self._defaults[name]

    def tensor(self, model: str, name: str) -> torch.Tensor:
        """Model `model`'s tensor `name` in the output vocabulary, in float32."""
        t = self.readers[model].get(name, dtype=torch.float32)
        idx = self.index[model]
        tokens = idx.numel()
        out = torch.zeros((self.rows, *t.shape[1:]), dtype=torch.float32)
        has = idx >= 0
        out[:tokens][has] = t[idx[has]]
        need, fill = self.defaults(name)
        lacks = ~has[need]
        out[need[lacks]] = fill[lacks]
        if self.rows > tokens:  # padding rows: the mean of the token rows, as mergekit pads
            out[tokens:] = out[:tokens].mean(0)
        return out

    def identity(self) -> bool:
        """True when no model's rows move: then the merge is the plain one."""
        return all(
            idx.numel() == self.rows
            and bool((idx == torch.arange(self.rows)).all())
            and all(self.readers[m].infos[n].shape[0] == self.rows for n in self.names_of(m))
            for m, idx in self.index.items()
        )

    def names_of(self, model: str) -> list[str]:
        return [n for n in self.names if n in self.readers[model]]


class RemappedReader(CheckpointReader):
    """A reader whose token-indexed tensors come in the output vocabulary (shape and values);
    every other tensor is the model's own. Built over an open reader; shares its files."""

    def __init__(self, inner: CheckpointReader, model: str, remap: VocabRemap) -> None:
        self.__dict__.update(inner.__dict__)
        self.inner = inner
        self.model = model
        self.remap = remap
        # a file name that is no safetensors file: readers of raw files (the disk residency
        # tier) then ask `get`, which gives the re-laid-out rows
        self.infos = {
            n: replace(i, shape=(remap.rows, *i.shape[1:]), file=f"{i.file}#vocab")
            if n in remap.names
            else i
            for n, i in inner.infos.items()
        }
        self._config = {**inner.config, "vocab_size": remap.rows}

    def get(
        self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        if name not in self.remap.names:
            return self.inner.get(name, device=device, dtype=dtype)
        stored = stored_float_dtype(self.inner.infos[name].dtype)
        return self.remap.tensor(self.model, name).to(device=device, dtype=dtype or stored)


def _stripped(tok: Any, rows: int | None, where: str) -> Any:
    """mergekit strips tokens at or past the model's rows from the base tokenizer; that rework
    of a BPE tokenizer is not carried over: refused in one line."""
    extra = [t for t, i in tok.get_vocab().items() if rows is not None and i >= rows]
    if extra:
        raise ConfigError(
            f"{where}: its tokenizer has {len(extra)} tokens past its {rows} embedding rows "
            f"(e.g. {extra[0]!r}); mergekit would rebuild that tokenizer without them, which "
            "evomerge does not: use a tokenizer with one token per row"
        )
    return tok


def union_tokenizer(base_tok: Any, toks: Mapping[str, Any], rows: Mapping[str, int | None]) -> Any:
    """mergekit's build_union_tokenizer: the base's tokenizer plus every other model's tokens
    it lacks (normal tokens, then added tokens with their settings), models in order."""
    import transformers

    out_added: dict[str, Any] = {}
    out_vocab: dict[str, int] = {}
    for m, tok in toks.items():
        size = rows[m] or tok.vocab_size
        added = tok.added_tokens_decoder
        added_text = {info.content for info in added.values()}
        for t, i in tok.get_vocab().items():
            if i >= size or t in added_text:
                continue
            out_vocab.setdefault(t, len(out_vocab))
        for i, info in added.items():
            if i < size:
                out_added.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as p:  # a copy, so the base's tokenizer stays as it is
        base_tok.save_pretrained(p, legacy_format=False, safe_serialization=True)
        res = transformers.AutoTokenizer.from_pretrained(p, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in out_added and t not in base_vocab:
            res.add_tokens(t)
    for info in out_added.values():
        res.add_tokens(info)
    return res


def output_tokenizer(
    readers: Mapping[str, CheckpointReader], source: str, base: str | None
) -> tuple[Any, dict[str, Any], dict[str, int | None], str]:
    """mergekit's build_tokenizer: (the output tokenizer for `source`, each model's tokenizer
    (None: none loads), each model's rows, the donor model: the base, else the first)."""
    names = list(readers)
    donor = base if base in readers else names[0]
    if source not in KEYWORDS and source not in readers:
        raise ConfigError(
            f"tokenizer_source {source!r} is neither base, union nor one of the models "
            f"({', '.join(names)})"
        )
    rows = {m: vocab_rows(r) for m, r in readers.items()}
    toks = {m: load_tokenizer(_tokenizer_path(r)) for m, r in readers.items()}
    if toks[donor] is None:
        raise NoTokenizerError(
            f"tokenizer_source {source}: model {donor!r} has no tokenizer that loads, and the "
            "output tokenizer is built from it (as mergekit does)"
        )
    base_tok = _stripped(toks[donor], rows[donor], f"model {donor!r}")
    if source == "base":
        out_tok = base_tok
    elif source == "union":
        order = [donor, *(m for m in names if m != donor and toks[m] is not None)]
        out_tok = union_tokenizer(base_tok, {m: toks[m] for m in order}, rows)
    else:
        out_tok = toks[source]
        if out_tok is None:
            raise NoTokenizerError(f"tokenizer_source {source}: model {source!r} has no tokenizer")
    return out_tok, toks, rows, donor


def build_remap(
    readers: Mapping[str, CheckpointReader],
    source: str,
    base: str | None,
    fill: Callable[[str], Sequence[str]] | None = None,
    *,
    pad_to_multiple_of: int | None = None,
) -> VocabRemap | None:
    """The output tokenizer for `source` ('base', 'union' or a model name) and every model's
    rows in it; None when every model already has that vocabulary, row for row. `base` is the
    base model's name (None: the first model, mergekit's donor)."""
    names = list(readers)
    out_tok, toks, rows, donor = output_tokenizer(readers, source, base)
    vocab_out = out_tok.get_vocab()
    tokens = len(vocab_out)
    index: dict[str, torch.Tensor] = {}
    for m in names:
        vocab = (toks[m] or toks[donor]).get_vocab()
        size = rows[m] if rows[m] is not None else len(vocab)
        idx = torch.full((tokens,), -1, dtype=torch.long)
        for t, j in vocab_out.items():
            i = vocab.get(t)
            if i is not None and i < size:
                idx[j] = i
        index[m] = idx
    pad = pad_to_multiple_of
    out_rows = tokens if not pad or tokens % pad == 0 else (tokens // pad + 1) * pad
    same = torch.arange(tokens)
    if out_rows == tokens and all(
        rows[m] == tokens and bool((idx == same).all()) for m, idx in index.items()
    ):
        return None  # every model has this vocabulary row for row: nothing moves
    vocab_names = set(vocab_tensor_names(readers[donor]))  # one architecture: the donor's names
    _check_hidden(readers, vocab_names)
    return VocabRemap(
        tokenizer=out_tok,
        rows=out_rows,
        index=index,
        names=frozenset(vocab_names),
        fill=fill or (lambda _name: names),
        base=base if base in readers else None,
        readers=readers,
    )


def _tokenizer_path(reader: CheckpointReader) -> Path:
    return Path(getattr(reader, "tokenizer_path", reader.path))


def _check_hidden(readers: Mapping[str, CheckpointReader], vocab_names: set[str]) -> None:
    """Only the rows of token-indexed tensors may differ; a hidden size that differs is no
    vocabulary change, and no merge can combine it."""
    first = next(iter(readers))
    for n in sorted(vocab_names):
        shapes = {m: r.infos[n].shape for m, r in readers.items() if n in r.infos}
        ref = shapes.get(first) or next(iter(shapes.values()))
        for m, s in shapes.items():
            if s[1:] != ref[1:]:
                raise IncompatibleModelsError(
                    f"tensor {n!r} has shape {list(ref)} in {first!r} but {list(s)} in {m!r}: "
                    "beyond the vocabulary rows the models differ (hidden size), so they "
                    "cannot be merged"
                )


def remap_readers(
    readers: Mapping[str, CheckpointReader],
    source: str | None,
    base: str | None,
    fill: Callable[[str], Sequence[str]] | None = None,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, CheckpointReader]:
    """The readers in the output vocabulary of `source` (its rows padded to a multiple of
    `pad_to_multiple_of`); as they are when `source` is None or every model already has that
    vocabulary row for row."""
    if source is None:
        return dict(readers)
    try:
        remap = build_remap(readers, source, base, fill, pad_to_multiple_of=pad_to_multiple_of)
    except NoTokenizerError:  # no vocabulary to re-lay out in: the rows stay as they are
        return dict(readers)
    if remap is None or remap.identity():
        return dict(readers)
    return {m: RemappedReader(r, m, remap) for m, r in readers.items()}


def recipe_fill(
    recipe: Any, sides: Mapping[str, str] | None = None
) -> Callable[[str], Sequence[str]]:
    """The models whose rows fill a missing token of one tensor: those mergekit gathers for
    it, the first matching section's models, plus the base outside slices (mergekit adds it).
    `sides`: each tensor's place outside the blocks, for `outside` sections (plan.outside_sides)."""
    sides = sides or {}

    def fill(name: str) -> Sequence[str]:
        section = next((s for s in recipe.sections if s.matches(name, None, sides.get(name))), None)
        models = list(section.models) if section is not None else list(recipe.models)
        if recipe.base_model and not recipe.slices and recipe.base_model not in models:
            models.append(recipe.base_model)
        return models

    return fill


def output_remap(readers: Mapping[str, CheckpointReader]) -> VocabRemap | None:
    """The vocabulary rework these readers carry, None when they carry none."""
    for r in readers.values():
        if isinstance(r, RemappedReader):
            return r.remap
    return None


def write_tokenizer(folder: Path, readers: Mapping[str, CheckpointReader]) -> None:
    """Beside merged weights in the output vocabulary: its tokenizer (with its chat template)
    instead of the copied one, and config.json's vocab_size, as mergekit writes them."""
    remap = output_remap(readers)
    if remap is None:
        return
    for n in TOKENIZER_FILES:
        (folder / n).unlink(missing_ok=True)
    remap.tokenizer.save_pretrained(str(folder))
    cfg_path = folder / "config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        cfg["vocab_size"] = remap.rows
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

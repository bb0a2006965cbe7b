"""What a mergekit file asks of the model files that a Recipe cannot say: tokenizers, input dtype.

mergekit rebuilds the embedding rows of every model for the output tokenizer when a
`tokenizer_source` or `tokenizer:` block is given (permuted to the output vocabulary, resized
to its length, padded to a multiple). evomerge merges rows as they are (embedding row handling
is issue 15), which is the same arithmetic exactly when every model has the output tokenizer's
vocabulary, in the same order, with one row per token: then `union` and `base` are the base's
tokenizer, and the permutation is the identity. Anything else is refused in one line, never
merged differently. `dtype` makes mergekit cast the sources before merging; a cast that rounds
is said in a warning (evomerge merges the stored values in float32).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.mergekit_params import warn
from evomerge.mergekit_read import MergekitFile, TokenizerSpec

# Casts that keep every value (source dtype -> dtype): the rest round.
_EXACT = {
    ("bfloat16", "float32"),
    ("float16", "float32"),
    ("bfloat16", "float64"),
    ("float16", "float64"),
    ("float32", "float64"),
}


def check_mergekit_files(mk: MergekitFile, where: str) -> None:
    """Refuse what evomerge would merge differently from mergekit; warn where it rounds less."""
    if mk.tokenizer is not None:
        models = dict(mk.recipe.models)
        check_tokenizer(mk.tokenizer, models, mk.recipe.base_model, where, labels=mk.refs)
    if mk.dtype is not None:
        _check_cast(mk, where)


def _vocab(path: Path) -> dict[str, int] | None:
    """The tokenizer's `get_vocab()` as mergekit reads it (fast tokenizer), None without one."""
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception:  # mergekit: "Unable to load tokenizer ... Assuming same as base"
        return None
    return dict(tok.get_vocab())


def _rows(path: Path) -> int | None:
    """The embedding rows mergekit assumes: config.json's vocab_size."""
    import json

    cfg = path / "config.json"
    if not cfg.exists():
        return None
    n = json.loads(cfg.read_text()).get("vocab_size")
    return n if isinstance(n, int) else None


def check_tokenizer(
    spec: TokenizerSpec,
    models: Mapping[str, str],
    base: str | None,
    where: str,
    *,
    labels: Mapping[str, str] | None = None,
) -> None:
    """ConfigError unless mergekit's embedding rework for `spec` is the identity for `models`
    (name -> path or hub id); `base` is the base model's name (None: the first model);
    `labels` name the models in messages as the user wrote them."""
    label = dict(labels or {})
    from evomerge.checkpoint import resolve_model_path

    names = list(models)
    donor = base or names[0]
    paths = {n: resolve_model_path(models[n], where=f"model {n!r}") for n in names}
    vocabs = {n: _vocab(p) for n, p in paths.items()}
    if vocabs[donor] is None:
        raise ConfigError(
            f"{where}: {spec.written}: model {label.get(donor, donor)!r} has no tokenizer that "
            "loads, and mergekit builds the output tokenizer from it"
        )
    out_name = spec.source if spec.source not in ("base", "union") else donor
    out_vocab = vocabs[out_name] or vocabs[donor]
    assert out_vocab is not None
    unsupported = f"{spec.written} is not supported yet (issue 15)"
    for n in names:
        vocab = vocabs[n] if vocabs[n] is not None else vocabs[donor]
        if vocab != out_vocab:
            raise ConfigError(
                f"{where}: {unsupported}: the vocabularies of {label.get(out_name, out_name)!r} and "
                f"{label.get(n, n)!r} differ "
                f"({len(out_vocab)} and {len(vocab or {})} tokens"
                f"{', in another order' if len(out_vocab) == len(vocab or {}) else ''}), so "
                "mergekit would rebuild the embedding rows"
            )
        rows = _rows(paths[n])
        if rows is not None and rows != len(out_vocab):
            raise ConfigError(
                f"{where}: {unsupported}: model {label.get(n, n)!r} has {rows} embedding rows for "
                f"{len(out_vocab)} tokens, so mergekit would resize its embeddings"
            )
    missing = [t for t in spec.tokens if t not in out_vocab]
    forced = [t for t, cfg in spec.tokens.items() if _forced(cfg)]
    if missing or forced:
        what = f"adds token {missing[0]!r}" if missing else f"forces token {forced[0]!r}"
        raise ConfigError(
            f"{where}: tokenizer.tokens {what}; new or re-sourced embedding rows are not "
            "supported yet (issue 15)"
        )
    pad = spec.pad_to_multiple_of
    if pad is not None and len(out_vocab) % pad:
        raise ConfigError(
            f"{where}: tokenizer.pad_to_multiple_of {pad} would pad the {len(out_vocab)} "
            "embedding rows; not supported yet (issue 15)"
        )


def _forced(cfg: Any) -> bool:
    return isinstance(cfg, Mapping) and bool(cfg.get("force"))


def _check_cast(mk: MergekitFile, where: str) -> None:
    from evomerge import dtypes
    from evomerge.checkpoint import CheckpointReader

    want = dtypes.ALIASES.get(str(mk.dtype).lower(), mk.dtype)
    for name, ref in mk.recipe.models.items():
        reader = CheckpointReader(ref, where=f"model {name!r}")
        stored = {
            dtypes.from_safetensors(i.dtype)
            for i in reader.infos.values()
            if dtypes.from_safetensors(i.dtype) in dtypes.FLOATS
        }
        rounded = sorted(s for s in stored if s != want and (s, want) not in _EXACT)
        if rounded:
            warn(
                f"{where}: dtype {want}: mergekit casts the sources (model {name!r} is stored as "
                f"{rounded[0]}) to {want} before merging; evomerge merges the stored values in "
                f"float32 and writes {mk.recipe.dtype or want}, so the tensors differ by {want} "
                "rounding, and where trimming (TIES, DARE, breadcrumbs, DELLA) meets values "
                f"tied in {want}, by which of them are kept"
            )
            return

"""What a mergekit file asks of the model files that a Recipe cannot say: tokenizers, input dtype.

mergekit rebuilds the embedding rows of every model for the output tokenizer when a
`tokenizer_source` or `tokenizer:` block is given (permuted to the output vocabulary, resized
to its length, padded to a multiple). evomerge does the same for `base`, `union` and a model's
tokenizer, padded or not (`evomerge.vocab`); what it does not do (per-token sources, forced or
new tokens) is refused in one line, never merged differently. `dtype` makes mergekit cast the sources before merging; a cast that rounds
is said in a warning (evomerge merges the stored values in float32).
"""

from __future__ import annotations

from collections.abc import Mapping
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


def check_tokenizer(
    spec: TokenizerSpec,
    models: Mapping[str, str],
    base: str | None,
    where: str,
    *,
    labels: Mapping[str, str] | None = None,
) -> None:
    """ConfigError for what of mergekit's embedding rework evomerge does not carry out:
    `tokenizer.tokens` entries that add, force or re-source a token's rows. The rework itself
    (union, base or a model's vocabulary, padded rows) is `evomerge.vocab`'s. `models`:
    name -> path or hub id; `base` the base model's name; `labels` name models as written."""
    if not spec.tokens:
        return
    from evomerge.checkpoint import CheckpointReader
    from evomerge.vocab import build_remap, output_tokenizer

    label = dict(labels or {})
    readers = {n: CheckpointReader(ref, where=f"model {n!r}") for n, ref in models.items()}
    source = spec.source
    out_vocab = output_tokenizer(readers, source, base)[0].get_vocab()
    missing = [t for t in spec.tokens if t not in out_vocab]
    forced = [t for t, cfg in spec.tokens.items() if _forced(cfg)]
    if missing or forced:
        what = f"adds token {missing[0]!r}" if missing else f"forces token {forced[0]!r}"
        raise ConfigError(
            f"{where}: tokenizer.tokens {what}; new or re-sourced embedding rows are not "
            "supported (give the token in a model's tokenizer instead)"
        )
    remap = build_remap(readers, source, base)
    for t in spec.tokens if remap is not None else ():
        lacking = [m for m, idx in remap.index.items() if idx[out_vocab[t]] < 0]
        if lacking:
            raise ConfigError(
                f"{where}: tokenizer.tokens sets the rows of {t!r}, which model "
                f"{label.get(lacking[0], lacking[0])!r} lacks; choosing the source of a "
                "missing token's rows is not supported (mergekit's default fill is)"
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

"""Does a config.json describe the weights beside it? Layer count, hidden size and vocabulary.

Why: transformers builds the model from config.json and fills what the weights lack with random
values (a warning at most), so a config claiming 3 layers over weights for 2 gives a model with a
random third block, a search that tunes coefficients of a block that does not exist, and an export
whose config claims 3 layers. A width or vocabulary that disagrees fails later, in a worker, with
a shape traceback. Both are checked here from the header's names and shapes, before anything runs.

Generic over architectures: the field names are the ones HF configs use (llama `num_hidden_layers`,
gpt2 `n_layer`/`n_embd`, mpt `d_model`/`n_layers`, chatglm `num_layers`/`padded_vocab_size`), the
embedding is found by its usual names (`embed_tokens`, `wte`, `embed_in`, `word_embeddings`,
`tok_embeddings`), tied embeddings (no `lm_head`) are fine, and a multimodal config's
`text_config` is checked against its language model. What cannot be found is not checked.
Pure functions over names and shapes (no I/O): `checkpoint.CheckpointReader` calls them on open.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The first field present wins, in this order (chatglm: padded_vocab_size is the embedding's).
LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
# The embedding's width: OPT's word_embed_proj_dim and ALBERT's embedding_size differ from hidden.
WIDTH_FIELDS = ("word_embed_proj_dim", "embedding_size", "hidden_size", "n_embd", "d_model", "dim")
VOCAB_FIELDS = ("padded_vocab_size", "vocab_size", "n_vocab")
EMBED_NAMES = frozenset({"embed_tokens", "wte", "embed_in", "word_embeddings", "tok_embeddings"})
HEAD_NAMES = frozenset({"lm_head", "embed_out"})


def config_mismatch(
    config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    layers: Mapping[str, int | None],
) -> str | None:
    """What in `config` disagrees with the tensors (`shapes` by name, `layers`: each name's block
    index or None), naming the field; None when nothing does or nothing can be checked."""
    cfg, prefix = _text_config(config)
    names = list(shapes)
    if prefix:  # a multimodal checkpoint: its language model's tensors, when they are named so
        names = [n for n in names if "language_model" in n] or names
    problem = _layer_mismatch(cfg, prefix, names, layers, config)
    if problem:
        return problem
    embeds = sorted(n for n in names if _named(n, EMBED_NAMES) and len(shapes[n]) == 2)
    heads = sorted(n for n in names if _named(n, HEAD_NAMES) and len(shapes[n]) == 2)
    for tensor in embeds[:1] + heads[:1]:
        rows, width = shapes[tensor]
        for fields, got, what in ((VOCAB_FIELDS, rows, "rows"), (WIDTH_FIELDS, width, "columns")):
            field, value = _field(cfg, fields)
            if field is not None and value != got:
                return (
                    f"{prefix}{field} is {value} but {tensor} has shape {list(shapes[tensor])} "
                    f"({got} {what})"
                )
    return None


def _layer_mismatch(
    cfg: Mapping[str, Any],
    prefix: str,
    names: list[str],
    layers: Mapping[str, int | None],
    config: Mapping[str, Any],
) -> str | None:
    field, claimed = _field(cfg, LAYER_FIELDS)
    if field is None or config.get("is_encoder_decoder"):
        return None  # an encoder and a decoder share the block names: no one count to compare
    if prefix and not any("language_model" in n for n in names):
        return None  # vision and text blocks would be counted together
    indices = {i for i in (layers.get(n) for n in names) if i is not None}
    if not indices:
        return None
    count = max(indices) + 1
    extra = _int(cfg.get("num_nextn_predict_layers")) or 0  # DeepSeek-V3 stores MTP blocks after
    if count != claimed and count != claimed + extra:
        return f"{prefix}{field} is {claimed} but the weights hold {count} layers (0-{count - 1})"
    missing = sorted(set(range(count)) - indices)
    if missing:
        shown = ", ".join(str(i) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
        return f"the weights hold no tensors for layer {shown} of 0-{count - 1} ({prefix}{field} {claimed})"
    return None


def _text_config(config: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """The config that describes the language model, and the prefix that names its fields."""
    text = config.get("text_config")
    if isinstance(text, Mapping) and not any(f in config for f in LAYER_FIELDS):
        return text, "text_config."
    return config, ""


def _field(cfg: Mapping[str, Any], fields: tuple[str, ...]) -> tuple[str | None, int | None]:
    """The first of `fields` that holds an integer, and its value."""
    for f in fields:
        value = _int(cfg.get(f))
        if value is not None:
            return f, value
    return None, None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _named(tensor: str, kinds: frozenset[str]) -> bool:
    """'model.embed_tokens.weight' is named 'embed_tokens' (the module before `.weight`)."""
    parts = tensor.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in kinds

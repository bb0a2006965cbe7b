"""Reading a mergekit merge YAML as mergekit 0.1.5 reads it, into our Recipe.

mergekit's config models (pydantic, `extra` ignored) drop keys they do not know, coerce scalars
with pydantic's lax rules (`"1e-5"` is a float, `"yes"` is true), ignore parameters a method does
not take, and feed `base_model` to every method as one more input when `models:` does not list it.
A file mergekit runs must run here with the same tensors, so this reader does the same; where
mergekit silently drops something, we say so in one warning line (logger `evomerge.mergekit`,
shown on stderr), and errors name what the user wrote (`models[1] (./code)`, `slices[2]`), never
our internal sections. What needs the model files (tokenizers, stored dtypes) is checked by
`mergekit_files`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.hub_ref import display_name
from evomerge.mergekit_params import ParamReader, merged, warn
from evomerge.recipe import Recipe
from evomerge.yaml_io import validate_model

# The keys of mergekit's config models (mergekit/config.py, tokenizer/config.py).
TOP_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "slices",
    "modules",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
)
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "residual_weight", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
# mergekit's methods whose input contract ignores base_model (BasePolicy.IGNORED): every other
# method refuses a slice whose sources lack the base.
BASE_IGNORED = frozenset({"linear", "passthrough", "karcher"})


@dataclass(frozen=True)
class TokenizerSpec:
    """What the file asks of the output tokenizer: `source` is 'base', 'union' or a model name;
    `tokens` and `pad_to_multiple_of` come from a `tokenizer:` block."""

    source: str
    written: str  # how the user wrote it, for messages: "tokenizer_source: union"
    tokens: Mapping[str, Any]
    pad_to_multiple_of: int | None


@dataclass(frozen=True)
class MergekitFile:
    """A mergekit YAML read: the recipe, and what `mergekit_files` checks against the models."""

    recipe: Recipe
    tokenizer: TokenizerSpec | None
    dtype: str | None  # mergekit's `dtype`: the sources are cast to it before merging
    refs: Mapping[str, str]  # model name -> the reference as the user wrote it


def _name_models(refs: list[str]) -> dict[str, str]:
    """Short unique names from paths: '/x/math-7b' -> 'math-7b' (suffixes on clashes)."""
    names: dict[str, str] = {}
    for ref in refs:
        if ref in names.values():
            continue
        stem = display_name(ref)  # 'org/m@v2' -> 'm': a pinned revision is no name
        name, k = stem, 2
        while name in names or name == "union":  # a tokenizer_source keyword
            name, k = f"{stem}-{k}", k + 1
        names[name] = ref
    return names


def _abs(ref: str, base_dir: Path | None) -> str:
    """mergekit resolves a relative path from the working directory; a path that exists only
    next to the file means that file's folder (each side of a LoRA's 'base+adapter')."""
    if "+" in ref and not Path(ref).exists():
        return "+".join(_abs(part, base_dir) for part in ref.split("+"))
    if (
        base_dir is not None
        and not Path(ref).is_absolute()
        and (base_dir / ref).exists()
        and not Path(ref).exists()
    ):
        return str((base_dir / ref).resolve())
    return ref


def read_mergekit(
    data: Mapping[str, Any], *, where: str = "mergekit config", base_dir: Path | None = None
) -> MergekitFile:
    """The recipe mergekit would run for `data`, and what the model files must be checked for."""
    from evomerge.methods import METHODS

    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping at the top level, got {type(data).__name__}"
        )
    method_name = data.get("merge_method")
    if not isinstance(method_name, str):
        raise ConfigError(f"{where}: merge_method must be a method name, got {method_name!r}")
    if method_name not in METHODS:
        raise ConfigError(f"{where}: merge_method: {METHODS.unknown_message(method_name)}")
    method = METHODS.get(method_name)
    rd = ParamReader(where, method_name, method)
    rd.keys(data, TOP_KEYS, "")
    if data.get("modules"):
        raise ConfigError(
            f"{where}: modules: (per-module merges of multimodal models) is not supported; "
            "use models: or slices:"
        )
    models_in = data.get("models") or []
    slices_in = data.get("slices") or []
    if bool(models_in) == bool(slices_in):
        raise ConfigError(f"{where}: give exactly one of `models` or `slices` (mergekit's rule)")
    if data.get("tokenizer_source") is not None and data.get("tokenizer") is not None:
        raise ConfigError(
            f"{where}: give tokenizer_source or a tokenizer: block, not both (mergekit's rule)"
        )

    base_ref = rd.model_ref(data["base_model"], "base_model") if data.get("base_model") else None
    global_params = rd.parameters(data.get("parameters"), "parameters", per_model_level=False)
    refs: list[str] = [base_ref] if base_ref else []
    inputs: list[tuple[str, dict[str, Any], str]] = []  # (ref, params, where written)
    slices: list[tuple[list[tuple[str, tuple[int, int], dict[str, Any]]], dict[str, Any]]] = []
    if models_in:
        if not isinstance(models_in, list):
            raise ConfigError(f"{where}: models must be a list, got {models_in!r}")
        for i, m in enumerate(models_in):
            ref = rd.model_ref(m.get("model") if isinstance(m, Mapping) else m, f"models[{i}]")
            at = f"models[{i}] ({ref})"
            params: dict[str, Any] = {}
            if isinstance(m, Mapping):
                rd.keys(m, MODEL_KEYS, f"models[{i}]")
                params = rd.parameters(m.get("parameters"), at, per_model_level=True)
            inputs.append((ref, params, at))
            refs.append(ref)
    else:
        if not isinstance(slices_in, list):
            raise ConfigError(f"{where}: slices must be a list, got {slices_in!r}")
        for i, sl in enumerate(slices_in):
            slices.append(_read_slice(rd, sl, i, base_ref, global_params))
            refs += [ref for ref, _, _ in slices[-1][0]]
    tok = _tokenizer_spec(rd, data)
    if tok is not None and tok.source not in ("base", "union"):
        refs.append(tok.source)
    names = _name_models(refs)
    by_ref = {ref: name for name, ref in names.items()}
    base = by_ref[base_ref] if base_ref else None
    recipe_slices: list[dict[str, Any]] | None = None

    if models_in:
        sections = [_models_section(rd, inputs, by_ref, base_ref, global_params)]
    else:
        sections, recipe_slices = _slice_sections(rd, slices, by_ref, global_params)
    if data.get("chat_template"):
        warn(
            f"{where}: chat_template is not applied yet: the output keeps the tokenizer files "
            "of the base (or first) model as they are"
        )
    rd.flush()
    dtype = _dtype_name(rd, data.get("dtype"), "dtype")
    out_dtype = _dtype_name(rd, data.get("out_dtype"), "out_dtype")
    tokenizer_source = None  # our Recipe's: a model's name, "base" or "union" (evomerge.vocab)
    if tok is not None:
        if tok.source == "base":
            tokenizer_source = base or "base"
        else:
            tokenizer_source = by_ref.get(tok.source, tok.source)
    recipe = {
        "models": {n: _abs(r, base_dir) for n, r in names.items()},
        "base_model": base,
        "dtype": out_dtype or dtype,
        "tokenizer_source": tokenizer_source,
        "pad_to_multiple_of": tok.pad_to_multiple_of if tok is not None else None,
        "sections": sections,
        "slices": recipe_slices,
    }
    recipe_obj = validate_model(Recipe, {k: v for k, v in recipe.items() if v is not None}, where)
    if tok is not None and tok.source not in ("base", "union"):
        tok = TokenizerSpec(by_ref[tok.source], tok.written, tok.tokens, tok.pad_to_multiple_of)
    return MergekitFile(recipe_obj, tok, dtype, dict(names))


def _models_section(
    rd: ParamReader,
    inputs: list[tuple[str, dict[str, Any], str]],
    by_ref: Mapping[str, str],
    base_ref: str | None,
    global_params: dict[str, Any],
) -> dict[str, Any]:
    """The `models:` form: one section over every tensor; mergekit adds base_model as one more
    input when the list lacks it ("Base model specified but not in input models - adding")."""
    method, where = rd.method, rd.where
    base = by_ref[base_ref] if base_ref else None
    section_models = {by_ref[ref]: params for ref, params, _ in inputs}
    if base is not None and base not in section_models:
        section_models[base] = {}
    for ref, params, at in inputs:
        if by_ref[ref] == base and params and method.skips_base_model:
            warn(
                f"{where}: {at} is the base_model; {rd.method_name} uses none of its "
                f"parameters ({', '.join(params)}), as in mergekit"
            )
        rd.require(at, params, global_params, is_base=by_ref[ref] == base)
    appended = base_ref is not None and base_ref not in [ref for ref, _, _ in inputs]
    if appended:
        rd.require(f"base_model ({base_ref})", {}, global_params, is_base=True, appended=True)
    n = len(section_models) - (1 if base is not None and method.skips_base_model else 0)
    try:
        method.check_model_count(n, f"{where}: models")
    except ConfigError as exc:
        more = " (with base_model, which mergekit adds as one more input)" if appended else ""
        raise ConfigError(f"{exc}{more}") from None
    return {
        "label": "models",
        "method": rd.method_name,
        "parameters": global_params,
        "models": section_models,
    }


def _slice_sections(
    rd: ParamReader,
    slices: list[tuple[list[tuple[str, tuple[int, int], dict[str, Any]]], dict[str, Any]]],
    by_ref: Mapping[str, str],
    global_params: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The `slices:` form: a section per slice over its output layers, then the tensors outside
    the blocks as mergekit plans them: those before the blocks (embeddings) from the first
    slice, those after (final norm, lm_head) from the last (zipped with the first slice's
    sources, so at most that many); `outside` sections, placed by the architecture's own order."""
    sections: list[dict[str, Any]] = []
    recipe_slices: list[dict[str, Any]] = []
    start = 0
    for i, (sources, slice_params) in enumerate(slices):
        length = sources[0][1][1] - sources[0][1][0]
        recipe_slices.append(
            {"sources": [{"model": by_ref[ref], "layer_range": lr} for ref, lr, _ in sources]}
        )
        sections.append(
            {
                "label": f"slices[{i}]",
                "layers": [start, start + length],
                "method": rd.method_name,
                "parameters": merged(slice_params, global_params),
                "models": {by_ref[ref]: p for ref, _, p in sources},
            }
        )
        start += length
    first, last = slices[0], slices[-1]
    sections.append(
        {
            "label": "slices[0]",
            "outside": "pre",
            "method": rd.method_name,
            "parameters": merged(first[1], global_params),
            "models": {by_ref[ref]: p for ref, _, p in first[0]},
        }
    )
    sections.append(
        {
            "label": f"slices[{len(slices) - 1}]",
            "outside": "post",
            "method": rd.method_name,
            "parameters": merged(last[1], global_params),
            "models": {by_ref[ref]: p for ref, _, p in last[0][: len(first[0])]},
        }
    )
    return sections, recipe_slices


def _read_slice(
    rd: ParamReader, sl: Any, i: int, base_ref: str | None, global_params: Mapping[str, Any]
) -> tuple[list[tuple[str, tuple[int, int], dict[str, Any]]], dict[str, Any]]:
    at = f"slices[{i}]"
    if not isinstance(sl, Mapping):
        raise rd.fail(at, f"expected a mapping with sources, got {sl!r}")
    rd.keys(sl, SLICE_KEYS, at)
    slice_params = rd.parameters(sl.get("parameters"), f"{at}.parameters", per_model_level=False)
    if sl.get("residual_weight") is not None:
        warn(f"{rd.where}: {at}: residual_weight is ignored (mergekit does not use it either)")
    srcs = sl.get("sources") or []
    if not isinstance(srcs, list) or not srcs:
        raise rd.fail(at, "has no sources")
    sources = []
    for j, s in enumerate(srcs):
        sat = f"{at}.sources[{j}]"
        if not isinstance(s, Mapping):
            raise rd.fail(sat, f"expected {{model, layer_range}}, got {s!r}")
        rd.keys(s, SOURCE_KEYS, sat)
        ref = rd.model_ref(s.get("model"), sat)
        lr = s.get("layer_range")
        if (
            not isinstance(lr, list)
            or len(lr) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
            or not 0 <= lr[0] < lr[1]
        ):
            raise rd.fail(
                f"{sat} ({ref})", f"layer_range must be [start, end) with start < end, got {lr!r}"
            )
        params = rd.parameters(s.get("parameters"), f"{sat} ({ref})", per_model_level=True)
        rd.require(
            f"{sat} ({ref})", params, {**global_params, **slice_params}, is_base=ref == base_ref
        )
        sources.append((ref, (lr[0], lr[1]), params))
    lengths = {lr[1] - lr[0] for _, lr, _ in sources}
    if len(lengths) != 1:
        raise rd.fail(
            at, "all sources of a slice need layer ranges of the same length (mergekit's rule)"
        )
    slice_base = sl.get("base_model")
    if slice_base is not None and rd.model_ref(slice_base, f"{at}.base_model") != base_ref:
        raise rd.fail(
            f"{at}.base_model",
            "a base_model per slice that differs from the top-level base_model is not supported",
        )
    if (
        base_ref is not None
        and rd.method_name not in BASE_IGNORED
        and base_ref not in [ref for ref, _, _ in sources]
    ):
        raise rd.fail(
            at,
            f"base_model {base_ref} is not among this slice's sources; {rd.method_name} needs it "
            "there (mergekit: 'Base input is not present in merge inputs')",
        )
    return sources, slice_params


def _tokenizer_spec(rd: ParamReader, data: Mapping[str, Any]) -> TokenizerSpec | None:
    src = data.get("tokenizer_source")
    block = data.get("tokenizer")
    if src is None and block is None:
        return None
    if block is not None:
        if not isinstance(block, Mapping):
            raise rd.fail("tokenizer", f"expected a mapping, got {block!r}")
        rd.keys(block, TOKENIZER_KEYS, "tokenizer")
        src = block.get("source", "union")  # mergekit's TokenizerConfig default
        written = f"tokenizer.source: {src}"
        tokens = block.get("tokens") or {}
        pad = block.get("pad_to_multiple_of")
        if not isinstance(tokens, Mapping):
            raise rd.fail(
                "tokenizer.tokens", f"expected a mapping of token -> settings, got {tokens!r}"
            )
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise rd.fail(
                "tokenizer.pad_to_multiple_of", f"expected a positive integer, got {pad!r}"
            )
    else:
        written, tokens, pad = f"tokenizer_source: {src}", {}, None
    if src in ("base", "union"):
        return TokenizerSpec(str(src), written, tokens, pad)
    ref = rd.model_ref(src, "tokenizer_source" if block is None else "tokenizer.source")
    return TokenizerSpec(ref, written, tokens, pad)


def _dtype_name(rd: ParamReader, value: Any, key: str) -> str | None:
    """mergekit's dtype names, 'torch.' prefix allowed; checked here so the error names the key."""
    from evomerge.checkpoint import parse_dtype

    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    parse_dtype(name, where=f"{rd.where}: {key}")
    return name


def from_mergekit(
    data: Mapping[str, Any], *, where: str = "mergekit config", base_dir: Path | None = None
) -> Recipe:
    """The Recipe of a mergekit merge YAML (no file checks; `recipe_loader` adds them)."""
    return read_mergekit(data, where=where, base_dir=base_dir).recipe

"""Our Recipe -> mergekit's merge YAML (reading is `mergekit_read`, re-exported here).

Writing (`to_mergekit`) needs every
tensor's resolved values (the caller plans them with `plan`), because mergekit evaluates
gradients of non-layer tensors at t = 0 while our sections can give them their own values; those
tensors get exact-name filter entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from evomerge.checkpoint import layer_suffix
from evomerge.errors import ConfigError
from evomerge.mergekit_read import from_mergekit
from evomerge.recipe import Recipe, evaluate_value

__all__ = ["from_mergekit", "to_mergekit"]


class OutTensorLike(Protocol):
    """What `to_mergekit` reads of a `plan.OutTensor`."""

    @property
    def name(self) -> str: ...
    @property
    def layer(self) -> int | None: ...
    @property
    def t(self) -> float: ...


class TensorTaskLike(Protocol):
    """What `to_mergekit` reads of a `plan.TensorTask`: one tensor's resolved values."""

    @property
    def out(self) -> OutTensorLike: ...
    @property
    def models(self) -> tuple[str, ...]: ...
    @property
    def model_params(self) -> tuple[dict[str, Any], ...]: ...
    @property
    def global_params(self) -> dict[str, Any]: ...


def to_mergekit(
    recipe: Recipe, tasks: Sequence[TensorTaskLike], *, vocab_differs: bool = False
) -> dict[str, Any]:
    """mergekit YAML reproducing the same tensors, or ConfigError saying why it cannot.

    `tasks` are the recipe's tensors resolved by `plan` (`plan_merge`, or `resolve_task` over
    `build_layout`), one per output tensor in layout order. Per-layer values become gradient
    lists with one entry per layer (exact at each layer); name filters become mergekit filter
    lists; non-layer tensors get exact-name filters first. `vocab_differs`: the models'
    vocabularies differ, so the recipe's `tokenizer_source` re-lays out their rows
    (`evomerge.vocab`) and must be written.
    """
    from evomerge.methods import METHODS

    methods = {s.method for s in recipe.sections}
    if len(methods) != 1:
        raise ConfigError(
            f"mergekit applies one merge method per config; this recipe uses {sorted(methods)}"
        )
    if recipe.slices:
        raise ConfigError("recipes with slices are exported to mergekit only from mergekit configs")
    method = methods.pop()
    if METHODS.get(method).randomized:
        raise ConfigError(
            f"method {method!r} drops parameters at random; mergekit draws its masks with its own "
            "random generator, so mergekit-yaml would give different tensors"
        )
    layout = [t.out for t in tasks]
    n_layers = 1 + max((o.layer for o in layout if o.layer is not None), default=0)
    kinds = _tensor_kinds(layout)
    participants = [m for m in recipe.models if any(m in t.models for t in tasks)]

    def value_spec(get: Any) -> Any:
        """Filter list: exact names for non-layer tensors, then one per-layer list per kind."""
        entries: list[dict[str, Any]] = []
        for t in tasks:
            if t.out.layer is None:
                entries.append({"filter": t.out.name, "value": get(t)})
        for kind in kinds:
            per_layer = []
            for layer in range(n_layers):
                t = next(x for x in tasks if x.out.layer == layer and _kind(x.out.name) == kind)
                per_layer.append(get(t))
            value = per_layer[0] if len(set(map(repr, per_layer))) == 1 else per_layer
            entries.append({"filter": kind, "value": value})
        values = {repr(e["value"]) for e in entries}
        return entries[0]["value"] if len(values) == 1 else entries

    models_out = []
    for m in participants:
        p_names = sorted(
            {k for t in tasks if m in t.models for k in t.model_params[t.models.index(m)]}
        )
        params = {}
        for p in p_names:
            params[p] = value_spec(
                lambda t, m=m, p=p: (
                    _round(t.model_params[t.models.index(m)][p]) if m in t.models else 0.0
                )
            )
        models_out.append({"model": recipe.models[m], "parameters": params})
    g_names = sorted({k for t in tasks for k in t.global_params})
    global_params = {p: value_spec(lambda t, p=p: _round(t.global_params.get(p))) for p in g_names}
    out: dict[str, Any] = {
        "merge_method": method,
        "models": models_out,
        "parameters": global_params,
    }
    # mergekit feeds base_model to every method as one more input (linear would then ask for its
    # weight), so name it only where our tasks use it. tokenizer_source is written when it says
    # more than "the base's" or the vocabularies differ: without one mergekit copies config and
    # tokenizer from base_model (or the first model) without re-mapping the embeddings.
    spec = METHODS.get(method)
    # skips_base_model: the base is the origin of the others' task vectors (nuslerp, multislerp)
    uses_base = spec.needs_base or spec.skips_base_model or recipe.base_model in participants
    if recipe.base_model and uses_base:
        out["base_model"] = recipe.models[recipe.base_model]
    source = recipe.tokenizer_source
    if source is not None and (vocab_differs or source != recipe.base_model):
        if vocab_differs and recipe.base_model and not uses_base:
            raise ConfigError(
                "the models' vocabularies differ and the base fills the rows of tokens a model "
                f"lacks, but {method} takes no base_model in mergekit, which would fill them "
                "from the other models only"
            )
        source = "base" if source == recipe.base_model else recipe.models.get(source, source)
        if recipe.pad_to_multiple_of is None:
            out["tokenizer_source"] = source
        else:
            out["tokenizer"] = {"source": source, "pad_to_multiple_of": recipe.pad_to_multiple_of}
    out["dtype"] = "float32"
    if recipe.dtype:
        out["out_dtype"] = recipe.dtype
    _check_resolution(out, tasks, recipe)
    return out


def _check_resolution(out: dict[str, Any], tasks: Sequence[TensorTaskLike], recipe: Recipe) -> None:
    """Resolve every tensor's values from the written config by mergekit's rules (first
    matching substring filter, gradients at t): a name filter that also matches another
    tensor's name would silently give it the wrong values."""
    by_path = {recipe.models[m]: m for m in recipe.models}
    for t in tasks:
        for key, spec in out["parameters"].items():
            got = evaluate_value(spec, t.out.name, t.out.t)
            want = _round(t.global_params.get(key))
            if not (got == want or _close(got, want)):
                raise ConfigError(_ambiguous(t.out.name, key))
        for entry in out["models"]:
            m = by_path[entry["model"]]
            if m not in t.models:
                continue
            params = t.model_params[t.models.index(m)]
            for key, spec in entry["parameters"].items():
                got = evaluate_value(spec, t.out.name, t.out.t)
                want = _round(params[key])
                if not (got == want or _close(got, want)):
                    raise ConfigError(_ambiguous(t.out.name, f"{m}.{key}"))


def _close(a: Any, b: Any) -> bool:
    return isinstance(a, float) and isinstance(b, float) and abs(a - b) <= 1e-12 * max(1.0, abs(b))


def _ambiguous(tensor: str, param: str) -> str:
    return (
        f"mergekit's substring filters cannot single out tensor {tensor!r} for parameter "
        f"{param!r} (its name is part of another tensor's name)"
    )


def _round(v: Any) -> Any:
    return float(v) if isinstance(v, float) else v


def _kind(name: str) -> str:
    """The part of a layer tensor's name after its index: 'model.layers.3.mlp.up.weight' -> '.mlp.up.weight'."""
    return layer_suffix(name) or name


def _tensor_kinds(layout: Sequence[OutTensorLike]) -> list[str]:
    seen: dict[str, None] = {}
    for o in layout:
        if o.layer is not None:
            seen.setdefault(_kind(o.name), None)
    return list(seen)

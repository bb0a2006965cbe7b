"""Turn a Recipe plus the sources' tensor headers into one task per output tensor.

Planning reads only safetensors headers, so every user error (unknown method, bad parameter,
mismatched shapes, a tensor no section covers) surfaces before any weight is loaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from evomerge.checkpoint import CheckpointReader, layer_index, with_layer_index
from evomerge.errors import ConfigError, IncompatibleModelsError
from evomerge.methods import METHODS
from evomerge.methods.base import MergeMethod
from evomerge.recipe import Recipe, Section, evaluate_value


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the output and where each model's matching tensor lives."""

    name: str
    layer: int | None  # output block index
    shape: tuple[int, ...]
    sources: Mapping[str, str]  # model name -> tensor name in that model
    t: float = 0.0  # position within its slice, for gradients (mergekit's t)
    side: str | None = None  # outside the blocks: "pre" or "post" (architectures.outside_sides)


@dataclass(frozen=True)
class TensorTask:
    out: OutTensor
    method: MergeMethod
    base: str | None  # model name of the base, if the method uses one
    models: tuple[str, ...]  # participating models, base first when it takes part
    model_params: tuple[dict[str, Any], ...]
    global_params: dict[str, Any]
    seed: int


def _check_same(readers: Mapping[str, CheckpointReader], ref_name: str) -> None:
    ref = readers[ref_name]
    ref_type = ref.config.get("model_type")
    for name, r in readers.items():
        if name == ref_name:
            continue
        mt = r.config.get("model_type")
        if ref_type and mt and mt != ref_type:
            raise IncompatibleModelsError(
                f"model {name!r} is a {mt!r} model but {ref_name!r} is a {ref_type!r}; "
                "only models of one architecture can be merged"
            )


def build_layout(recipe: Recipe, readers: Mapping[str, CheckpointReader]) -> list[OutTensor]:
    """Output tensors in a stable order with their source tensors; checks names and shapes agree."""
    if recipe.slices:
        _check_same(readers, recipe.reference_model)
        return _slice_layout(recipe, readers, readers[recipe.reference_model])
    used = [m for m in recipe.models if m in readers]
    return model_layout(
        {m: readers[m] for m in used}, recipe.reference_model, sides=needs_sides(recipe)
    )


def needs_sides(recipe: Recipe) -> bool:
    """Whether planning must place the tensors outside the blocks before or after them (slices,
    `outside` sections): it builds the architecture on the meta device once, so only then."""
    return bool(recipe.slices) or any(s.outside is not None for s in recipe.sections)


def outside_sides(reader: CheckpointReader) -> dict[str, str]:
    """Each tensor outside the blocks of `reader`: "pre" or "post" (evomerge.architectures)."""
    from evomerge.architectures import outside_sides as sides

    return dict(sides(reader.config, reader.infos))


def model_layout(
    readers: Mapping[str, CheckpointReader], reference: str, *, sides: bool = False
) -> list[OutTensor]:
    """The layout of models that share the reference's tensors: each output tensor from the
    same-named tensor of every model (the search's live model has exactly this layout); with
    `sides`, each tensor outside the blocks knows whether it is before or after them."""
    ref = readers[reference]
    _check_same(readers, reference)
    out: list[OutTensor] = []
    n_layers = ref.num_layers
    side = outside_sides(ref) if sides else {}
    for name, info in ref.infos.items():
        for m, reader in readers.items():
            other = reader.infos.get(name)
            if other is None:
                raise IncompatibleModelsError(
                    f"tensor {name!r} of {reference!r} is missing from model {m!r}; the models "
                    "do not share one architecture"
                )
            if other.shape != info.shape:
                rows = other.shape[1:] == info.shape[1:] and layer_index(name) is None
                raise IncompatibleModelsError(
                    f"tensor {name!r} has shape {list(info.shape)} in {reference!r} but "
                    f"{list(other.shape)} in {m!r}"
                    + (
                        "; if tokens were added, set tokenizer_source (base, union or a "
                        "model's name)"
                        if rows
                        else ""
                    )
                )
        layer = layer_index(name)
        t = 0.0 if layer is None else (layer / (n_layers - 1) if n_layers > 1 else 1.0)
        out.append(
            OutTensor(name, layer, info.shape, {m: name for m in readers}, t, side.get(name))
        )
    return out


def _slice_layout(
    recipe: Recipe, readers: Mapping[str, CheckpointReader], ref: CheckpointReader
) -> list[OutTensor]:
    """Frankenmerge layout: output block j comes from each slice source's block start + offset;
    the tensors before the blocks from the first slice's models, those after from the last's."""
    slices = recipe.slices or []
    by_layer: dict[str, dict[int, list[str]]] = {}
    for m, r in readers.items():
        d: dict[int, list[str]] = {}
        for n in r.infos:
            li = layer_index(n)
            if li is not None:
                d.setdefault(li, []).append(n)
        by_layer[m] = d
    pre: list[OutTensor] = []
    post: list[OutTensor] = []
    first = [s.model for s in slices[0].sources]
    last = [s.model for s in slices[-1].sources]
    for name, side in outside_sides(ref).items():
        info = ref.infos[name]
        is_pre = side == "pre"
        models = first if is_pre else last
        for m in models:
            if name not in readers[m].infos or readers[m].infos[name].shape != info.shape:
                raise IncompatibleModelsError(
                    f"tensor {name!r} is missing or differs in model {m!r}"
                )
        (pre if is_pre else post).append(
            OutTensor(name, None, info.shape, {m: name for m in models}, 0.0, side)
        )
    layers: list[OutTensor] = []
    j = 0
    for si, sl in enumerate(slices):
        for off in range(sl.length):
            t = off / (sl.length - 1) if sl.length > 1 else 1.0
            src0 = sl.sources[0]
            template = by_layer[src0.model].get(src0.layer_range[0] + off)
            if template is None:
                raise ConfigError(
                    f"slices[{si}]: model {src0.model!r} has no layer {src0.layer_range[0] + off}"
                )
            for tname in template:
                srcs: dict[str, str] = {}
                shape = readers[src0.model].infos[tname].shape
                for s in sl.sources:
                    sname = with_layer_index(tname, s.layer_range[0] + off)
                    info = readers[s.model].infos.get(sname)
                    if info is None or info.shape != shape:
                        raise IncompatibleModelsError(
                            f"slices[{si}]: tensor {sname!r} is missing or differs in model {s.model!r}"
                        )
                    srcs[s.model] = sname
                layers.append(OutTensor(with_layer_index(tname, j), j, shape, srcs, t))
            j += 1
    return pre + layers + post


def section_t(section: Section, out: OutTensor) -> float:
    """Gradient position: within the section's layer range if it has one, else the slice's t."""
    if section.layers is None or out.layer is None:
        return out.t
    start, end = section.layers
    return (out.layer - start) / (end - start - 1) if end - start > 1 else 1.0


def tensor_seed(recipe_seed: int, tensor_name: str) -> int:
    digest = hashlib.blake2b(f"{recipe_seed}:{tensor_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def resolve_task(recipe: Recipe, out: OutTensor, index: int | None = None) -> TensorTask:
    """Method and parameter values for one output tensor (first matching section wins)."""
    section = next((s for s in recipe.sections if s.matches(out.name, out.layer, out.side)), None)
    if section is None:
        raise ConfigError(
            f"no section of the recipe covers tensor {out.name!r}; add a section without `layers`"
        )
    si = recipe.sections.index(section) if index is None else index
    label = section.label or f"sections[{si}]"
    where = f"{label} ({section.method}, tensor {out.name})"
    method = METHODS.get(section.method, where=label)
    t = section_t(section, out)
    base = recipe.base_model
    models = [m for m in recipe.models if m in section.models and m in out.sources]
    missing = [m for m in section.models if m not in out.sources]
    if missing:
        raise ConfigError(
            f"{where}: model {missing[0]!r} is not a source of this tensor (check slices)"
        )
    if method.skips_base_model:
        models = [m for m in models if m != base]
    elif base in models:
        models.remove(base)
        models.insert(0, base)
    if method.needs_base and (base is None or base not in out.sources):
        raise ConfigError(f"{where}: method {method.name!r} needs base_model")
    method.check_model_count(len(models), where)
    model_param_names = {p.name for p in method.model_params}
    for key in section.parameters:
        method.param(key, where)  # unknown names raise here
    glob: dict[str, Any] = {}
    for key, value in section.parameters.items():
        if key in model_param_names:
            continue
        v = evaluate_value(value, out.name, t)
        if v is not None:
            glob[key] = v
    glob = method.fill_global_params(glob, where)
    per_model = []
    for m in models:
        given: dict[str, Any] = {}
        for p in model_param_names:
            for scope in (section.models.get(m, {}), section.parameters):
                if p in scope:
                    v = evaluate_value(scope[p], out.sources[m], t)
                    if v is not None:
                        given[p] = v
                        break
        for key in section.models.get(m, {}):
            method.param(key, f"{where}, model {m}")
        per_model.append(method.fill_model_params(given, f"{where}, model {m}"))
    method.check_params(per_model, glob, where)
    return TensorTask(
        out=out,
        method=method,
        base=base if (method.needs_base or base in out.sources) else None,
        models=tuple(models),
        model_params=tuple(per_model),
        global_params=glob,
        seed=tensor_seed(recipe.seed, out.name),
    )


def open_readers(recipe: Recipe, *, allow_pickle: bool = False) -> dict[str, CheckpointReader]:
    """Every model's reader; with a `tokenizer_source`, in that output vocabulary (`vocab`)."""
    readers = {
        name: CheckpointReader(ref, allow_pickle=allow_pickle, where=f"model {name!r}")
        for name, ref in recipe.models.items()
    }
    if recipe.tokenizer_source is None:
        return readers
    from evomerge.vocab import recipe_fill, remap_readers

    ref = readers[recipe.reference_model]
    return remap_readers(
        readers,
        recipe.tokenizer_source,
        recipe.base_model,
        recipe_fill(recipe, outside_sides(ref) if needs_sides(recipe) else None),
        pad_to_multiple_of=recipe.pad_to_multiple_of,
    )


def plan_merge(recipe: Recipe, readers: Mapping[str, CheckpointReader]) -> list[TensorTask]:
    """Every output tensor's task; raises user errors before any weight is read."""
    layout = build_layout(recipe, readers)
    return [resolve_task(recipe, out) for out in layout]

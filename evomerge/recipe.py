"""A merge recipe: for every tensor, which method and which parameters.

Our YAML (`evomerge_recipe: 1`) is a list of sections. The first section whose `layers` range and
`filter` match a tensor decides its method and parameters; a section with no `layers` also matches
tensors outside the transformer blocks (embeddings, final norm, lm_head), and `outside: pre` or
`post` narrows it to those before the first block or after the last, in the architecture's own
order (`evomerge.architectures.outside_sides`; mergekit's slices take them from the first and
the last slice). Parameter values follow
mergekit's rules, so a mergekit config converts without loss: a scalar; a list of numbers
interpolated across the section's layers (a gradient); or a list of `{filter, value}` entries
where the first filter that is a substring of the tensor name wins.

Optional `slices` lay out the output's blocks from source layer ranges (frankenmerges); without
them the output has the sources' layout.

This module is a leaf: the models and value evaluation only. Reading files (ours or mergekit's)
is `recipe_loader`, planning tensors is `plan`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RECIPE_FORMAT = 1
Scalar = bool | int | float | str


class FilterValue(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    filter: str | None = None
    value: Any


ParamValue = Scalar | list[float] | list[FilterValue]


class Section(BaseModel):
    """Method and parameters for the tensors this section matches."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    layers: tuple[int, int] | None = Field(
        None, description="output layer range [start, end); none = every tensor"
    )
    filter: str | None = Field(None, description="substring of the tensor name; none = any")
    outside: Literal["pre", "post"] | None = Field(
        None,
        description="only tensors outside the blocks: pre = before the first block in the "
        "architecture's module order (embeddings), post = after the last (final norm, lm_head)",
    )
    method: str
    parameters: dict[str, ParamValue] = Field(default_factory=dict, description="global parameters")
    models: dict[str, dict[str, ParamValue]] = Field(
        description="models taking part, each with its per-model parameters"
    )
    label: str | None = Field(
        None, description="what errors call this section (a mergekit file's `slices[2]`)"
    )

    @field_validator("layers")
    @classmethod
    def _range(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not (0 <= v[0] < v[1]):
            raise ValueError(f"layers must be [start, end) with 0 <= start < end, got {list(v)}")
        return v

    def matches(self, tensor_name: str, layer: int | None, side: str | None = None) -> bool:
        """`side`: the tensor's place outside the blocks ('pre', 'post'; None inside them)."""
        if self.layers is not None and (
            layer is None or not self.layers[0] <= layer < self.layers[1]
        ):
            return False
        if self.outside is not None and side != self.outside:
            return False
        return self.filter is None or self.filter in tensor_name


class SliceSource(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    layer_range: tuple[int, int]


class Slice(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    sources: list[SliceSource]

    @model_validator(mode="after")
    def _same_length(self) -> Slice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if not self.sources or len(lengths) != 1 or min(lengths) <= 0:
            raise ValueError(
                "every source of a slice needs a non-empty layer_range of the same length"
            )
        return self

    @property
    def length(self) -> int:
        r = self.sources[0].layer_range
        return r[1] - r[0]


class Recipe(BaseModel):
    """A whole merge, validated structurally at load (methods and values are checked when the
    merge is planned: `plan.resolve_task`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    evomerge_recipe: int = RECIPE_FORMAT
    models: dict[str, str] = Field(
        description="model name -> local path or hub id, in a fixed order"
    )
    base_model: str | None = None
    dtype: str | None = Field(
        None, description="output dtype; none = the base model's (or first model's)"
    )
    tokenizer_source: str | None = Field(
        None,
        description="output tokenizer, as in mergekit: base, union or a model's name; the "
        "token rows of every model are re-laid out in its vocabulary (`evomerge.vocab`)",
    )
    pad_to_multiple_of: int | None = Field(
        None,
        ge=1,
        description="with tokenizer_source: the token rows padded to a multiple (mergekit's "
        "tokenizer.pad_to_multiple_of; padding rows are the mean of the token rows)",
    )
    seed: int = Field(
        0, description="seed of random methods (DARE, DELLA), combined with each tensor name"
    )
    sections: list[Section]
    slices: list[Slice] | None = None

    @model_validator(mode="after")
    def _names(self) -> Recipe:
        known = set(self.models)
        if not self.models:
            raise ValueError("models is empty")
        if self.base_model is not None and self.base_model not in known:
            raise ValueError(
                f"base_model {self.base_model!r} is not one of models ({', '.join(self.models)})"
            )
        if self.tokenizer_source is not None and self.tokenizer_source not in (
            known | {"base", "union"}
        ):
            raise ValueError(
                f"tokenizer_source {self.tokenizer_source!r} is not base, union or one of models"
            )
        if self.pad_to_multiple_of is not None and self.tokenizer_source is None:
            raise ValueError("pad_to_multiple_of needs a tokenizer_source")
        if not self.sections:
            raise ValueError("sections is empty")
        for i, s in enumerate(self.sections):
            for m in s.models:
                if m not in known:
                    raise ValueError(f"sections[{i}] names model {m!r}, which is not in models")
        for i, sl in enumerate(self.slices or []):
            for src in sl.sources:
                if src.model not in known:
                    raise ValueError(
                        f"slices[{i}] names model {src.model!r}, which is not in models"
                    )
        return self

    @property
    def reference_model(self) -> str:
        """The model whose config, tokenizer and tensor layout the output follows."""
        if self.tokenizer_source in self.models:
            return self.tokenizer_source
        return self.base_model or next(iter(self.models))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=120)

    def content_hash(self) -> str:
        """Hash of what determines the merged tensors (paths and values), for dedup of candidates."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _interpolate(values: list[float], t: float) -> float:
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def evaluate_value(value: Any, tensor_name: str, t: float) -> Any:
    """Resolve one parameter value for a tensor: filters first, then gradients (mergekit's rules).

    Returns None when a filter list has no entry for this tensor (the next source of the
    parameter, or its default, then applies).
    """
    if isinstance(value, (FilterValue, Mapping)):
        value = [value]
    if isinstance(value, list):
        if not value:
            return None
        if all(isinstance(e, (FilterValue, Mapping)) for e in value):
            for e in value:
                f = e.filter if isinstance(e, FilterValue) else e.get("filter")
                if f is None or f == "*" or f in tensor_name:
                    return evaluate_value(
                        e.value if isinstance(e, FilterValue) else e["value"], tensor_name, t
                    )
            return None
        if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in value):
            return _interpolate([float(e) for e in value], t)
        return value[int(t * (len(value) - 1))]
    return value

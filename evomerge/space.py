"""Search spaces: which recipe values are searched, and the pure genome <-> Recipe mapping.

A space cuts the blocks into layer groups of `granularity` layers and each group into tensor
groups by name filter (e.g. attention vs the rest); tensors outside the blocks (embeddings, final
norm, lm_head) form one global group. Every group gets its own genes: a method choice when the
space offers several methods (a categorical; CMA-ES encodes it as one score per method, argmax
decodes), and each offered method's searched parameters, per model or global.

A genome is a flat `{gene name: value}` dict, so it is readable in trials.jsonl and the same for
every optimizer. Gene names look like `L0-1.attn.method` or `L0-1.attn.ties.math.density`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evomerge.errors import ConfigError
from evomerge.model_set import ModelSet
from evomerge.optimizers.base import Dimension
from evomerge.recipe import Recipe, Section
from evomerge.registry import Registry
from evomerge.space_mergekit import outside_sections, smooth_sections
from evomerge.yaml_io import format_validation_error, read_yaml

PRESETS_DIR = Path(__file__).resolve().parents[1] / "search_spaces"

#: Search-space presets by name: every YAML in search_spaces/, plus `evomerge.search_spaces`
#: entry points of other packages (a path to their YAML file).
SPACE_PRESETS: Registry[Path | str] = Registry(
    "search space preset",
    entry_points="evomerge.search_spaces",
    discover=lambda: {p.stem: p for p in sorted(PRESETS_DIR.glob("*.yaml"))},
)


class Range(BaseModel):
    """A searched number: bounds and the value the search starts from."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    low: float
    high: float
    init: float

    @model_validator(mode="after")
    def _order(self) -> Range:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if not self.low <= self.init <= self.high:
            raise ValueError(f"init ({self.init}) must lie within [{self.low}, {self.high}]")
        return self


Fixed = bool | int | float


class MethodSpace(BaseModel):
    """One method's parameters: searched ranges or fixed values."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    per_model: dict[str, Range | Fixed] = Field(default_factory=dict)
    parameters: dict[str, Range | Fixed] = Field(
        default_factory=dict, description="global parameters"
    )


class TensorGroup(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    filter: str | None = Field(
        None, description="substring of tensor names; the last group should have none (the rest)"
    )


class SpaceConfig(BaseModel):
    """A search space (preset file or inline in a study)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    description: str = ""
    granularity: int = Field(1, ge=1, description="layers per layer group")
    tensor_groups: list[TensorGroup] = Field(default_factory=lambda: [TensorGroup(name="all")])
    global_group: bool = Field(True, description="own genes for embeddings, final norm, lm_head")
    outside_blocks: Literal["first", "first_last"] = Field(
        "first",
        description="without a global group, tensors outside the blocks follow the first layer "
        "group; first_last: embeddings the first, final norm and lm_head the last (mergekit's "
        "slices rule, as mergekit-evolve decodes; evomerge.space_mergekit)",
    )
    smooth: bool = Field(
        False,
        description="each layer group's value is a control point of one gradient across all "
        "layers (mergekit-evolve's smooth), not a constant per group",
    )
    methods: dict[str, MethodSpace]

    @model_validator(mode="after")
    def _check(self) -> SpaceConfig:
        if not self.methods:
            raise ValueError("methods is empty")
        if not self.tensor_groups or self.tensor_groups[-1].filter is not None:
            raise ValueError(
                "the last tensor group must have no filter, so every tensor of a layer is covered"
            )
        names = [g.name for g in self.tensor_groups]
        if len(set(names)) != len(names):
            raise ValueError(f"tensor group names repeat: {names}")
        if (self.smooth or self.outside_blocks != "first") and (
            self.global_group or len(self.methods) > 1
        ):
            raise ValueError("smooth and outside_blocks need global_group false and one method")
        return self


def load_space(preset: str | None, overrides: Mapping[str, Any] | None, where: str) -> SpaceConfig:
    """A preset from search_spaces/ (or a YAML path), with inline fields of the study on top."""
    data: dict[str, Any] = {}
    if preset:
        is_file = preset.endswith((".yaml", ".yml"))
        path = Path(preset) if is_file else Path(SPACE_PRESETS.get(preset, where=where))
        loaded = read_yaml(path)
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a search space must be a mapping")
        data.update(loaded)
    data.update({k: v for k, v in (overrides or {}).items() if k != "preset"})
    try:
        return SpaceConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {format_validation_error(exc)}") from None


def fit_tensor_groups(config: SpaceConfig, tensor_names: Iterable[str], where: str) -> SpaceConfig:
    """A preset's role filters in the models' own names: a `self_attn` group on GPT-2 (whose
    attention is `attn`) or GPT-NeoX (`attention`) would match nothing and its genes would act on
    nothing, so such a filter becomes the architecture's (one warning line says so)."""
    from evomerge.architectures import role_filter
    from evomerge.mergekit_params import warn

    names = list(tensor_names)
    groups = []
    for g in config.tensor_groups:
        fit = role_filter(g.filter, names) if g.filter else None
        if fit is not None:
            warn(
                f"{where}.tensor_groups[{g.name}]: filter {g.filter!r} matches no tensor of these "
                f"models; using {fit[0]!r}, their {fit[1]} modules"
            )
            g = g.model_copy(update={"filter": fit[0]})
        groups.append(g)
    return config.model_copy(update={"tensor_groups": groups})


@dataclass(frozen=True)
class Group:
    """One block of genes: a layer range (None: the global group) and a tensor filter."""

    key: str
    layers: tuple[int, int] | None
    filter: str | None


@dataclass(frozen=True)
class SearchSpace:
    """A space bound to concrete models and a layer count: genes, decoding, and the start point."""

    config: SpaceConfig
    models: ModelSet  # genes are per source (models.sources); the base is not merged
    num_layers: int
    seed: int = 0
    dtype: str | None = None

    def __post_init__(self) -> None:
        from evomerge.methods import METHODS

        g = self.config.granularity
        if self.num_layers % g:
            raise ConfigError(
                f"search_space.granularity {g} does not divide the {self.num_layers} layers of the models "
                f"(use one of {', '.join(str(d) for d in range(1, self.num_layers + 1) if self.num_layers % d == 0)})"
            )
        n = len(self.models.sources)
        for name, ms in self.config.methods.items():
            where = f"search_space.methods.{name}"
            method = METHODS.get(name, where="search_space.methods")
            if method.needs_base and self.models.base is None:
                raise ConfigError(f"{where}: {name!r} needs models.base")
            method.check_model_count(n, where)
            for pname, val in ms.per_model.items():
                if not method.param(pname, where).per_model:
                    raise ConfigError(
                        f"{where}.per_model: {pname!r} is a global parameter; put it under parameters"
                    )
                for bound in (val.low, val.high) if isinstance(val, Range) else (val,):
                    method.param(pname, where).check(bound, f"{where}.per_model.{pname}")
            for pname, val in ms.parameters.items():
                if method.param(pname, where).per_model:
                    raise ConfigError(
                        f"{where}.parameters: {pname!r} is a per-model parameter; put it under per_model"
                    )
                for bound in (val.low, val.high) if isinstance(val, Range) else (val,):
                    method.param(pname, where).check(bound, f"{where}.parameters.{pname}")

    @property
    def groups(self) -> list[Group]:
        out = []
        g = self.config.granularity
        for start in range(0, self.num_layers, g):
            for tg in self.config.tensor_groups:
                out.append(
                    Group(f"L{start}-{start + g - 1}.{tg.name}", (start, start + g), tg.filter)
                )
        if self.config.global_group:
            out.append(Group("global", None, None))
        return out

    def _genes(self) -> list[tuple[Dimension, float | str]]:
        """Every gene with its bounds and start value, in a stable order."""
        genes: list[tuple[Dimension, float | str]] = []
        methods = list(self.config.methods)
        for group in self.groups:
            if len(methods) > 1:
                genes.append((Dimension(f"{group.key}.method", choices=tuple(methods)), methods[0]))
            for mname, ms in self.config.methods.items():
                for pname, val in ms.parameters.items():
                    if isinstance(val, Range):
                        genes.append(
                            (Dimension(f"{group.key}.{mname}.{pname}", val.low, val.high), val.init)
                        )
                for model in self.models.sources:
                    for pname, val in ms.per_model.items():
                        if isinstance(val, Range):
                            dim = Dimension(
                                f"{group.key}.{mname}.{model}.{pname}", val.low, val.high
                            )
                            genes.append((dim, val.init))
        return genes

    def dimensions(self) -> list[Dimension]:
        """What the optimizers see."""
        return [d for d, _ in self._genes()]

    def initial_genome(self) -> dict[str, float | str]:
        """The start point: each range's init and the first listed method."""
        return {d.name: init for d, init in self._genes()}

    def decode(self, genome: Mapping[str, float | str]) -> Recipe:
        """Genome -> Recipe. Pure: the same genome always gives the same recipe."""
        missing = [d.name for d in self.dimensions() if d.name not in genome]
        if missing:
            raise ConfigError(f"genome lacks gene {missing[0]!r} ({len(missing)} missing)")
        methods = list(self.config.methods)
        sections = []
        for group in self.groups:
            mname = str(genome[f"{group.key}.method"]) if len(methods) > 1 else methods[0]
            ms = self.config.methods[mname]
            params = {
                p: _value(v, genome, f"{group.key}.{mname}.{p}") for p, v in ms.parameters.items()
            }
            models = {
                m: {
                    p: _value(v, genome, f"{group.key}.{mname}.{m}.{p}")
                    for p, v in ms.per_model.items()
                }
                for m in self.models.sources
            }
            sections.append(
                Section(
                    layers=group.layers,
                    filter=group.filter,
                    method=mname,
                    parameters=params,
                    models=models,
                )
            )
        n_tg = len(self.config.tensor_groups)
        if self.config.smooth:
            sections = smooth_sections(sections, n_tg)
        elif self.config.outside_blocks == "first_last":
            sections += outside_sections(sections, n_tg)
        elif not self.config.global_group:
            # Tensors outside the blocks follow the first layer group's recipe.
            first = sections[len(self.config.tensor_groups) - 1]
            sections.append(first.model_copy(update={"layers": None, "filter": None}))
        return Recipe(
            models=dict(self.models.paths),
            base_model=self.models.base,
            tokenizer_source=self.models.tokenizer_source or self.models.base,
            dtype=self.dtype,
            seed=self.seed,
            sections=sections,
        )


def _value(spec: Range | Fixed, genome: Mapping[str, float | str], gene: str) -> Any:
    return round(float(genome[gene]), 6) if isinstance(spec, Range) else spec

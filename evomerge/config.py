"""study.yaml: one frozen, validated config for a whole study.

Validation here is cheap and complete for everything that needs no model: the shape, and each
plugin's own options (the optimizer's and the executor's `Options` models, found by name in their
registries). `evomerge.study_plan.build_plan` then checks what needs the models' headers and the
tasks (layer counts, methods versus sources, task names and metrics), still before any candidate
is scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.errors import ConfigError
from evomerge.executors import EXECUTORS
from evomerge.fidelity import FitnessConfig
from evomerge.hub_ref import display_name
from evomerge.objective import ObjectiveConfig
from evomerge.optimizers import OPTIMIZERS
from evomerge.residency import Residency
from evomerge.scoring.config import ScoringSettings
from evomerge.tracking.config import TrackingConfig
from evomerge.yaml_io import format_validation_error, read_yaml


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SourceModel(_Frozen):
    name: str = Field(description="short name used in recipes and gene names")
    path: str = Field(
        description="checkpoint folder or hub id, pinned to a branch, tag or commit with "
        "org/name@revision"
    )

    @field_validator("name")
    @classmethod
    def _clean(cls, v: str) -> str:
        if not v or any(c in v for c in ". /"):
            raise ValueError(f"model name {v!r} must be non-empty without '.', '/' or spaces")
        return v


class ModelsConfig(_Frozen):
    base: str | None = Field(
        None, description="the common base checkpoint the sources were fine-tuned from"
    )
    sources: list[SourceModel] = Field(description="the fine-tunes to merge")
    tokenizer_source: str | None = Field(
        None,
        description="output tokenizer when the vocabularies differ (tokens were added): base, "
        "union or a source's name, as in mergekit; every model's token rows are re-laid out in it",
    )

    @field_validator("sources", mode="before")
    @classmethod
    def _paths_to_models(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [
                {"name": display_name(str(e)).replace(".", "_"), "path": e}
                if isinstance(e, str)
                else e
                for e in v
            ]
        return v

    @model_validator(mode="after")
    def _unique(self) -> ModelsConfig:
        names = [s.name for s in self.sources]
        if len(names) < 2:
            raise ValueError("need at least two source models to merge")
        if len(set(names)) != len(names):
            raise ValueError(f"source names repeat: {names}")
        if "base" in names and self.base:
            raise ValueError("'base' is reserved for models.base; rename that source")
        src = self.tokenizer_source
        if src is not None and src not in ("base", "union", *names):
            raise ValueError(
                f"tokenizer_source {src!r} is not base, union or a source's name ({', '.join(names)})"
            )
        return self


class TasksConfig(_Frozen):
    include_path: list[str] = Field(
        default_factory=list, description="folders with lm-eval task YAMLs"
    )
    search: list[str] = Field(description="tasks whose metrics make the fitness")
    heldout: list[str] = Field(
        default_factory=list, description="tasks only reported, never optimized"
    )
    limit: int | float | None = Field(
        None, description="documents per task (first N), or a fraction"
    )
    num_fewshot: int | None = None
    batch_size: int = Field(16, ge=1)
    apply_chat_template: bool = False
    fewshot_seed: int = 1234

    @field_validator("include_path", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    def settings(self, split: Literal["search", "heldout"]) -> ScoringSettings | None:
        """The scoring settings of one split (None: the study has no held-out tasks)."""
        tasks = self.search if split == "search" else self.heldout
        if not tasks:
            return None
        return ScoringSettings(
            tasks=tuple(tasks),
            include_paths=tuple(self.include_path),
            limit=self.limit,
            num_fewshot=self.num_fewshot,
            batch_size=self.batch_size,
            apply_chat_template=self.apply_chat_template,
            fewshot_seed=self.fewshot_seed,
        )

    @model_validator(mode="after")
    def _disjoint(self) -> TasksConfig:
        if not self.search:
            raise ValueError("tasks.search is empty")
        both = set(self.search) & set(self.heldout)
        if both:
            raise ValueError(
                f"task {sorted(both)[0]!r} is both a search and a held-out task; held-out must stay unseen"
            )
        return self


class _PluginSection(BaseModel):
    """A section naming a plugin; every other key is that plugin's option (its Options model)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimizerConfig(_PluginSection):
    name: str = Field("cma", description="a registered optimizer (evomerge/optimizers)")

    @model_validator(mode="after")
    def _options_of_the_optimizer(self) -> OptimizerConfig:
        OPTIMIZERS.get(self.name).parse_options(self.options)
        return self


class BudgetConfig(_Frozen):
    max_trials: int = Field(
        50, ge=1, description="candidates in total (resume counts what is done)"
    )
    max_seconds: float | None = Field(
        None, gt=0, description="wall-clock limit of one run or resume"
    )
    max_items: int | None = Field(
        None, ge=1, description="fitness items scored in total, over every candidate and rung"
    )


class ExecutorConfig(_PluginSection):
    kind: str = Field("local", description="a registered executor: local, ray")
    workers: int = Field(1, ge=1)
    residency: Residency = Field(
        "auto",
        description="where each worker keeps the sources: device (all resident), host "
        "(streamed to the device per candidate), disk (memory-mapped), auto (the memory plan picks)",
    )

    @model_validator(mode="after")
    def _options_of_the_executor(self) -> ExecutorConfig:
        EXECUTORS.get(self.kind).parse_options(self.options)
        return self


class StudyConfig(_Frozen):
    name: str
    models: ModelsConfig
    search_space: dict[str, Any] = Field(description="{preset: NAME, ...inline overrides}")
    tasks: TasksConfig
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    fitness: FitnessConfig = Field(default_factory=FitnessConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    warm_start: str | None = Field(
        None, description="'uniform' (default start) or a recipe YAML to start from"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: str = Field("float32", description="dtype of the live model and the merged output")
    seed: int = 0
    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig, description="experiment trackers: wandb, mlflow (off)"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or "/" in v or v.startswith("."):
            raise ValueError(f"name {v!r} must be a plain folder name")
        return v

    @model_validator(mode="after")
    def _racing_ranks_one_fitness(self) -> StudyConfig:
        if self.fitness.racing and self.objective.multi:
            raise ValueError(
                "fitness.fidelity racing ranks candidates on one fitness; objective.multi "
                "needs fidelity: full"
            )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, width=120)


def load_study_config(path: str | Path, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Read, apply CLI overrides (dotted keys), validate; relative paths are relative to the file."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a study config must be a mapping")
    apply_overrides(data, overrides or {}, str(path))
    base_dir = Path(path).resolve().parent
    _absolutize(data, base_dir)
    return parse_study(data, str(path))


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any], where: str) -> None:
    """Set dotted keys (`budget.max_trials`) in a parsed study, making missing sections."""
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for i, p in enumerate(parents):
            if node.get(p) is None:  # absent, or an empty section (`budget:`)
                node[p] = {}
            if not isinstance(node[p], dict):
                section = ".".join(parents[: i + 1])
                raise ConfigError(f"{where}: cannot set {dotted}: {section} is not a section")
            node = node[p]
        node[leaf] = value


def parse_study(data: dict[str, Any], where: str) -> StudyConfig:
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {format_validation_error(exc)}") from None


def _absolutize(data: dict[str, Any], base_dir: Path) -> None:
    """Paths in a study file are relative to the file, not to wherever evomerge is run."""

    def fix(p: Any) -> Any:
        if isinstance(p, str) and not Path(p).is_absolute() and (base_dir / p).exists():
            return str((base_dir / p).resolve())
        return p

    models = data.get("models")
    if isinstance(models, dict):
        models["base"] = fix(models.get("base")) if models.get("base") else models.get("base")
        srcs = models.get("sources")
        if isinstance(srcs, list):
            models["sources"] = [
                {**s, "path": fix(s.get("path"))} if isinstance(s, dict) else fix(s) for s in srcs
            ]
    tasks = data.get("tasks")
    if isinstance(tasks, dict) and tasks.get("include_path"):
        inc = tasks["include_path"]
        tasks["include_path"] = [fix(p) for p in ([inc] if isinstance(inc, str) else inc)]
    if isinstance(data.get("warm_start"), str) and data["warm_start"] != "uniform":
        data["warm_start"] = fix(data["warm_start"])

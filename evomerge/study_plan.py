"""The study plan: everything a study needs, validated and built once, before any candidate.

`build_plan(config)` is the one place where a study's user errors surface (models, the space
against the models, tasks and metrics, the optimizer against the objectives and the start point),
and it returns a frozen `StudyPlan` whose parts go to the loop, the workers and the reports as
they are. Plugins are found by name in their registries; nothing here knows one by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.config import StudyConfig
from evomerge.errors import IncompatibleModelsError
from evomerge.executors import EXECUTORS, Executor
from evomerge.memory_plan import MemoryPlan, plan_for_study
from evomerge.model_set import ModelSet
from evomerge.objective import Objective
from evomerge.optimizers import OPTIMIZERS, Optimizer
from evomerge.options import PluginOptions
from evomerge.space import SearchSpace, fit_tensor_groups, load_space
from evomerge.worker import WorkerSpec


@dataclass(frozen=True)
class StudyPlan:
    """A validated study: the space, the objective, the models, what workers build, and the
    optimizer and executor to use (classes from their registries, with their parsed options).
    A frozen dataclass, not a config model: it holds live objects built from the config."""

    config: StudyConfig
    space: SearchSpace
    objective: Objective
    models: ModelSet
    worker_spec: WorkerSpec
    x0: dict[str, float | str]
    optimizer_class: type[Optimizer]
    executor_class: type[Executor]
    executor_options: PluginOptions
    #: bytes per device and host of each worker, and the residency tier (evomerge.memory_plan)
    memory: MemoryPlan | None = None

    def optimizer(self, state_dir: Path, *, resume: bool) -> Optimizer:
        """The study's optimizer: continued from `state_dir` when resuming and a state exists."""
        kwargs: dict[str, Any] = dict(
            n_objectives=self.objective.n_objectives,
            seed=self.config.seed,
            options=self.config.optimizer.options,
            state_dir=state_dir,
            x0=self.x0,
        )
        dims = self.space.dimensions()
        if resume and self.optimizer_class.has_state(state_dir):
            return self.optimizer_class.load(dims, **kwargs)
        return self.optimizer_class(dims, **kwargs)

    def executor(self) -> Executor:
        """Workers for this study (started now: bad models or tasks fail here, not later)."""
        return self.executor_class(
            self.worker_spec, workers=self.config.executor.workers, options=self.executor_options
        )


def build_plan(config: StudyConfig) -> StudyPlan:
    """All user errors surface here: models, space versus models, tasks and metrics, options."""
    from evomerge.checkpoint import CheckpointReader
    from evomerge.optimizers.base import check_x0

    readers: dict[str, CheckpointReader] = {}
    if config.models.base:
        readers["base"] = CheckpointReader(config.models.base, where="models.base")
    for source in config.models.sources:
        readers[source.name] = CheckpointReader(source.path, where=f"models.sources[{source.name}]")
    model_set = ModelSet(
        paths={n: r.location for n, r in readers.items()},
        base="base" if config.models.base else None,
        tokenizer_source=config.models.tokenizer_source,
    )
    from evomerge.vocab import remap_readers  # token rows in one vocabulary (tokens added)

    readers = remap_readers(readers, model_set.tokenizer_source, model_set.base)
    ref = readers[model_set.reference]
    check_compatible(readers, model_set.reference)
    space_cfg = load_space(config.search_space.get("preset"), config.search_space, "search_space")
    if "tensor_groups" not in config.search_space:  # a preset's: in the models' own names
        space_cfg = fit_tensor_groups(space_cfg, ref.names(), "search_space")
    space = SearchSpace(space_cfg, model_set, ref.num_layers, seed=config.seed, dtype=config.dtype)
    x0 = space.initial_genome()
    if config.warm_start and config.warm_start != "uniform":
        x0 = warm_start_genome(space, config.warm_start)
    scoring = config.tasks.settings("search")
    heldout = config.tasks.settings("heldout")
    from evomerge.scoring import describe_tasks

    catalog = describe_tasks(scoring)
    if heldout:
        describe_tasks(heldout)
    objective = Objective(config.objective, catalog)
    optimizer_class = OPTIMIZERS.get(config.optimizer.name, where="optimizer.name")
    optimizer_class.parse_options(config.optimizer.options)
    optimizer_class.check_objectives(objective.n_objectives)
    check_x0(space.dimensions(), x0)
    executor_class = EXECUTORS.get(config.executor.kind, where="executor.kind")
    # the tier `auto` resolves to, from the bytes each tier needs here (refused in `run` if none fits)
    memory = plan_for_study(config, readers, model_set.reference, space_cfg.methods)
    spec = WorkerSpec(
        models=model_set,
        device=config.device,
        dtype=config.dtype,
        scoring=scoring,
        heldout=heldout,
        fitness=config.fitness,
        seed=config.seed,
        residency=memory.tier,  # auto resolved by the memory plan (evomerge.memory_plan)
    )
    return StudyPlan(
        config=config,
        space=space,
        objective=objective,
        models=model_set,
        worker_spec=spec,
        x0=x0,
        optimizer_class=optimizer_class,
        executor_class=executor_class,
        executor_options=executor_class.parse_options(config.executor.options),
        memory=memory,
    )


def check_compatible(readers: Mapping[str, Any], reference: str) -> None:
    """Every model has the reference's tensors with the same shapes (from headers only)."""
    from evomerge.checkpoint import layer_index

    ref = readers[reference]
    for name, r in readers.items():
        for tname, info in ref.infos.items():
            other = r.infos.get(tname)
            if other is None or other.shape != info.shape:
                got = "missing" if other is None else f"shape {list(other.shape)}"
                rows = (
                    other is not None
                    and other.shape[1:] == info.shape[1:]
                    and layer_index(tname) is None
                )
                raise IncompatibleModelsError(
                    f"model {name!r} does not match the base: tensor {tname!r} is {got} "
                    f"(expected {list(info.shape)})"
                    + (
                        "; if tokens were added, set models.tokenizer_source (base, union or a "
                        "source's name)"
                        if rows
                        else ""
                    )
                )


def warm_start_genome(space: SearchSpace, recipe_path: str) -> dict[str, float | str]:
    """A start point from an earlier winner: its first section per group, clipped to the bounds."""
    from evomerge.recipe_loader import load_recipe_file

    recipe = load_recipe_file(recipe_path)
    genome = space.initial_genome()
    dims = {d.name: d for d in space.dimensions()}
    for group in space.groups:
        sec = next(
            (s for s in recipe.sections if s.layers == group.layers and s.filter == group.filter),
            None,
        )
        if sec is None or sec.method not in space.config.methods:
            continue
        if f"{group.key}.method" in dims:
            genome[f"{group.key}.method"] = sec.method
        for key, value in sec.parameters.items():
            gene = f"{group.key}.{sec.method}.{key}"
            if gene in dims and isinstance(value, (int, float)):
                genome[gene] = min(max(float(value), dims[gene].low), dims[gene].high)
        for model, params in sec.models.items():
            for key, value in params.items():
                gene = f"{group.key}.{sec.method}.{model}.{key}"
                if gene in dims and isinstance(value, (int, float)):
                    genome[gene] = min(max(float(value), dims[gene].low), dims[gene].high)
    return genome

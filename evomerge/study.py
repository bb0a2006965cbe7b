"""The study loop: ask, dispatch, record, tell, persist. It knows nothing of cma, Optuna or Ray.

Order of durability for every finished candidate: append its line to trials.jsonl (fsync), then
tell the optimizer and save its state, then rewrite best/ if it improved. A crash between any two
steps is repaired on resume: a proposal the optimizer still holds as pending but which has a line
in trials.jsonl is told from that line instead of being evaluated again.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.config import StudyConfig, parse_study
from evomerge.errors import ConfigError
from evomerge.runstore import RunStore, TrialRecord, best_trial
from evomerge.space import SearchSpace, load_space


@dataclass
class Prepared:
    """Everything validated before the first candidate: space, objective, worker spec."""

    config: StudyConfig
    space: SearchSpace
    objective: Any
    worker_spec: Any
    x0: dict[str, float | str]


def prepare(config: StudyConfig, *, check_tasks: bool = True) -> Prepared:
    """All user errors surface here: models, space versus models, tasks and metrics."""
    from evomerge.checkpoint import CheckpointReader
    from evomerge.objective import Objective
    from evomerge.worker import WorkerSpec

    sources = {s.name: s.path for s in config.models.sources}
    readers = {n: CheckpointReader(p, where=f"models.sources[{n}]") for n, p in sources.items()}
    base = None
    if config.models.base:
        readers["base"] = CheckpointReader(config.models.base, where="models.base")
        base = ("base", str(readers["base"].path))
    ref = readers["base" if base else next(iter(sources))]
    _check_compatible(readers, ref)
    space_cfg = load_space(config.search_space.get("preset"), config.search_space, "search_space")
    space = SearchSpace(
        space_cfg,
        {n: str(readers[n].path) for n in sources},
        base,
        ref.num_layers,
        seed=config.seed,
        dtype=config.dtype,
    )
    x0 = space.initial_genome()
    if config.warm_start and config.warm_start != "uniform":
        x0 = warm_start_genome(space, config.warm_start)
    scoring = _scoring_fields(config, config.tasks.search)
    heldout = _scoring_fields(config, config.tasks.heldout) if config.tasks.heldout else None
    catalog: dict[str, Any] = {}
    if check_tasks:
        from evomerge.scoring import ScoringConfig, describe_tasks

        catalog = describe_tasks(ScoringConfig(**scoring))
        if heldout:
            describe_tasks(ScoringConfig(**heldout))
    objective = Objective(config.objective, catalog)
    _check_optimizer(config, space, objective.n_objectives, x0)
    models = {**({"base": base[1]} if base else {}), **space.models}
    spec = WorkerSpec(
        models=models,
        base="base" if base else None,
        reference="base" if base else next(iter(sources)),
        device=config.device,
        dtype=config.dtype,
        scoring=scoring,
        heldout=heldout,
    )
    return Prepared(config, space, objective, spec, x0)


def _check_optimizer(
    config: StudyConfig, space: SearchSpace, n_objectives: int, x0: dict[str, Any]
) -> None:
    """Build the optimizer once in a scratch folder: names, options and objectives fail here."""
    import tempfile

    from evomerge.optimizers import create_optimizer

    with tempfile.TemporaryDirectory() as scratch:
        opt = create_optimizer(
            config.optimizer.name,
            space.dimensions(),
            n_objectives=n_objectives,
            seed=config.seed,
            options=config.optimizer.options,
            state_dir=Path(scratch),
            x0=x0,
        )
        opt.close()


def _check_compatible(readers: dict[str, Any], ref: Any) -> None:
    from evomerge.errors import IncompatibleModelsError

    for name, r in readers.items():
        for tname, info in ref.infos.items():
            other = r.infos.get(tname)
            if other is None or other.shape != info.shape:
                got = "missing" if other is None else f"shape {list(other.shape)}"
                raise IncompatibleModelsError(
                    f"model {name!r} does not match the base: tensor {tname!r} is {got} "
                    f"(expected {list(info.shape)})"
                )


def _scoring_fields(config: StudyConfig, tasks: list[str]) -> dict[str, Any]:
    t = config.tasks
    return {
        "tasks": tuple(tasks),
        "include_paths": tuple(t.include_path),
        "limit": t.limit,
        "num_fewshot": t.num_fewshot,
        "batch_size": t.batch_size,
        "apply_chat_template": t.apply_chat_template,
        "fewshot_seed": t.fewshot_seed,
    }


def warm_start_genome(space: SearchSpace, recipe_path: str) -> dict[str, float | str]:
    """A start point from an earlier winner: its first section per group, clipped to the bounds."""
    from evomerge.recipe import load_recipe_file

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


class InterruptGate:
    """Ctrl-C raises only while waiting on workers; during bookkeeping (append, tell, save) it
    is held until the step is complete, so state on disk is never half-updated. (pycma's
    pickling, for one, turns an interrupt inside it into an unrelated AttributeError.)"""

    def __init__(self) -> None:
        self.pending = False
        self.waiting = False
        self._previous: Any = None

    def __enter__(self) -> InterruptGate:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.waiting:
            raise KeyboardInterrupt
        self.pending = True

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    @contextmanager
    def waiting_on_workers(self) -> Iterator[None]:
        self.check()
        self.waiting = True
        try:
            yield
        finally:
            self.waiting = False


class Study:
    """Drives one run directory to its budget."""

    def __init__(self, store: RunStore, prepared: Prepared, *, progress: bool = True) -> None:
        self.store = store
        self.p = prepared
        self.config = prepared.config
        self.progress = progress
        self.records = store.read_trials()
        self.by_hash: dict[str, TrialRecord] = {
            r.recipe_hash: r for r in self.records if r.status != "duplicate"
        }
        self.recorded = {r.proposal: r for r in self.records}
        self.best = best_trial(self.records)

    def _optimizer(self, resume: bool) -> Any:
        from evomerge.optimizers import create_optimizer, load_optimizer

        opt = self.config.optimizer
        kwargs = dict(
            n_objectives=self.p.objective.n_objectives,
            seed=self.config.seed,
            options=opt.options,
            state_dir=self.store.dir,
            x0=self.p.x0,
        )
        dims = self.p.space.dimensions()
        if (resume and self.records) or (resume and _has_state(self.store.dir)):
            return load_optimizer(opt.name, dims, **kwargs)
        return create_optimizer(opt.name, dims, **kwargs)

    def run(
        self, *, resume: bool = False, executor_options: dict[str, Any] | None = None
    ) -> TrialRecord | None:
        from evomerge.executors import Job, make_executor
        from evomerge.progress import StudyProgress

        cfg = self.config
        self.store.repair()
        optimizer = self._optimizer(resume)
        optimizer.save()
        budget = cfg.budget.max_trials
        deadline = time.monotonic() + cfg.budget.max_seconds if cfg.budget.max_seconds else None
        self.store.set_state("running")
        redo: deque[Any] = deque()
        for prop in optimizer.pending():
            if prop.id in self.recorded:  # evaluated and appended, crash before tell
                optimizer.tell(prop.id, self.recorded[prop.id].fitness)
                optimizer.save()
            else:
                redo.append(prop)
        bar = StudyProgress(budget, enabled=self.progress, done=len(self.records), best=self.best)
        executor = make_executor(
            cfg.executor.kind,
            self.p.worker_spec,
            workers=cfg.executor.workers,
            **executor_settings(cfg),
            **(executor_options or {}),
        )
        in_flight: dict[int, Any] = {}
        stopped_by = "budget"
        try:
            with InterruptGate() as gate:
                while True:
                    gate.check()
                    out_of_time = deadline is not None and time.monotonic() >= deadline
                    while (
                        not out_of_time
                        and len(self.records) + len(in_flight) < budget
                        and len(in_flight) < executor.workers
                    ):
                        prop = redo.popleft() if redo else optimizer.ask()
                        if prop is None:
                            break
                        optimizer.save()
                        recipe = self.p.space.decode(prop.params)
                        h = recipe.content_hash()
                        if h in self.by_hash:
                            self._record_duplicate(optimizer, prop, h)
                            bar.update(self.records[-1], self.best)
                            continue
                        in_flight[prop.id] = (prop, recipe, h)
                        executor.submit(Job(prop.id, recipe.to_dict()))
                    if not in_flight:
                        if out_of_time:
                            stopped_by = "time"
                        break
                    with gate.waiting_on_workers():
                        results = executor.wait()
                    for result in results:
                        prop, recipe, h = in_flight.pop(result.job.key)
                        self._record(optimizer, prop, recipe, h, result.outcome)
                        bar.update(self.records[-1], self.best)
        except BaseException:  # Ctrl-C or a crash: what finished is already on disk
            self.store.set_state("interrupted", trials=len(self.records))
            raise
        finally:
            bar.close()
            executor.close()
        self.store.set_state("finished", trials=len(self.records), stopped_by=stopped_by)
        return self.best

    def _record(self, optimizer: Any, prop: Any, recipe: Any, h: str, outcome: Any) -> None:
        from evomerge.errors import CandidateError

        fitness = None
        error = outcome.error
        if outcome.scores is not None:
            try:
                fitness = list(self.p.objective.evaluate(outcome.scores))
            except CandidateError as exc:
                error = str(exc)
        rec = TrialRecord(
            trial=len(self.records),
            proposal=prop.id,
            status="ok" if fitness is not None else "failed",
            genome=dict(prop.params),
            recipe_hash=h,
            fitness=fitness,
            scores=outcome.scores or {},
            error=error,
            seconds={k: round(v, 4) for k, v in outcome.seconds.items()},
            worker=outcome.worker,
        )
        self._commit(optimizer, prop, rec)
        self.by_hash[h] = rec
        if rec.ok and (self.best is None or rec.fitness[0] > self.best.fitness[0]):
            self.best = rec
            self.store.write_best(rec, recipe.to_yaml())

    def _record_duplicate(self, optimizer: Any, prop: Any, h: str) -> None:
        first = self.by_hash[h]
        rec = TrialRecord(
            trial=len(self.records),
            proposal=prop.id,
            status="duplicate",
            genome=dict(prop.params),
            recipe_hash=h,
            fitness=first.fitness,
            scores=first.scores,
            error=first.error,
            duplicate_of=first.trial,
        )
        self._commit(optimizer, prop, rec)

    def _commit(self, optimizer: Any, prop: Any, rec: TrialRecord) -> None:
        self.store.append(rec)
        self.records.append(rec)
        self.recorded[prop.id] = rec
        optimizer.tell(prop.id, rec.fitness)
        optimizer.save()


def executor_settings(cfg: StudyConfig) -> dict[str, Any]:
    """The executor's own options from the study config (CLI flags are already merged in)."""
    ex = cfg.executor
    if ex.kind == "ray":
        out: dict[str, Any] = {"ray_address": ex.ray_address, "gpus_per_worker": ex.gpus_per_worker}
        if ex.threads is not None:
            out["cpus_per_worker"] = ex.threads
        return out
    return {"threads": ex.threads}


def _has_state(run_dir: Path) -> bool:
    return any((run_dir / n).exists() for n in ("optimizer.pkl", "optuna.db"))


def load_run_config(store: RunStore) -> StudyConfig:
    from evomerge.recipe import read_yaml

    data = read_yaml(store.dir / "study.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{store.dir / 'study.yaml'}: not a study config")
    return parse_study(data, str(store.dir / "study.yaml"))

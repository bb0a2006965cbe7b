"""The controller alone: ask + tell + persist per trial, through the real study loop.

A labelled microbenchmark. `Study.run` drives a real run directory (RunStore, scheduler,
trials.jsonl appended with fsync, the optimizer's state saved after every ask and tell, best/),
but candidates go to the `instant` executor registered here: K simulated workers whose
"evaluation" is a deterministic cheap function of the recipe (no merge, no scoring, about 0.1 ms),
finishing one at a time in a seeded random order, as asynchronous workers do. Everything the loop
does between two results is then the controller's own cost: the gap between one `wait()`
returning and the next `wait()` starting is one trial's record + tell + persist + ask, timed
here without any hook in the loop. The optimizer's own share (ask, tell, save) is timed by a thin
proxy around it, so the table also says how much of a trial is the optimizer and how much the rest.

The space is the demo study's (`evomerge zoo`: per-layer task arithmetic over 3 sources and 4
layers, 15 genes) on untrained checkpoints of the demo's shape, written once into the bench's
work folder (the controller never reads a weight).
"""

from __future__ import annotations

import random
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from evomerge.executors import EXECUTORS, Executor, Job, JobResult
from evomerge.options import PluginOptions
from evomerge.worker import Outcome, WorkerSpec

EXECUTOR = "instant"
#: windows of the growth columns: trials [a, b)
WINDOWS = ((0, 100), (900, 1000), (1900, 2000))


class InstantOptions(PluginOptions):
    order_seed: int = Field(0, description="seed of the order in which in-flight jobs finish")


class InstantExecutor(Executor):
    """K simulated workers with an instant, deterministic fitness; records the loop's gaps.

    `wait()` finishes one job, picked at random (seeded) among those in flight: results come
    back out of order, one per wait, as from workers of unequal speed. `gaps[i]` is the time the
    loop spent between the i-th result and its next `wait()`."""

    name = EXECUTOR
    Options = InstantOptions
    last: InstantExecutor | None = None  # the latest one built (the bench reads its gaps)

    def __init__(
        self, spec: WorkerSpec, *, workers: int = 1, options: PluginOptions | None = None
    ) -> None:
        from evomerge.scoring import describe_tasks

        super().__init__(spec, workers=workers, options=options)
        # every metric key of every search task, so any objective over them finds its values
        self.metrics = {
            t: list(m.higher_is_better) for t, m in describe_tasks(spec.scoring).items()
        }
        self.rng = random.Random(self.options.order_seed)  # type: ignore[attr-defined]
        self.jobs: list[Job] = []
        self.gaps: list[float] = []  # wall seconds
        self.cpu_gaps: list[float] = []  # this process's CPU seconds (all its threads)
        self.fitness_s = 0.0
        self._returned: tuple[float, float] | None = None
        InstantExecutor.last = self

    def submit(self, job: Job) -> None:
        self.jobs.append(job)

    def in_flight(self) -> int:
        return len(self.jobs)

    def _gap(self) -> None:
        """The loop's time since the last result: that result's record, tell, save, next ask."""
        if self._returned is not None:
            self.gaps.append(time.perf_counter() - self._returned[0])
            self.cpu_gaps.append(time.process_time() - self._returned[1])
            self._returned = None

    def close(self) -> None:  # the loop ends after the last result's bookkeeping
        self._gap()

    def wait(self) -> list[JobResult]:
        self._gap()
        now = time.perf_counter()
        job = self.jobs.pop(self.rng.randrange(len(self.jobs)))
        value = instant_fitness(job.recipe)
        scores = {task: dict.fromkeys(keys, value) for task, keys in self.metrics.items()}
        outcome = Outcome(scores=scores, error=None, seconds={"total": 0.0}, worker="instant")
        self._returned = (time.perf_counter(), time.process_time())
        self.fitness_s += self._returned[0] - now
        return [JobResult(job, outcome)]


def instant_fitness(recipe: Any) -> float:
    """A smooth function of the recipe's numbers with one optimum (no merge, no scoring): 1 minus
    the mean squared distance of each model parameter from a target that differs per model."""
    total, n = 0.0, 0
    for section in recipe.sections:
        for k, (_, params) in enumerate(sorted(section.models.items())):
            target = 0.25 + 0.3 * (k % 3)
            for value in params.values():
                if isinstance(value, (int, float)):
                    total += (float(value) - target) ** 2
                    n += 1
    return 1.0 - total / max(1, n)


def register_instant() -> None:
    if EXECUTOR not in EXECUTORS:
        EXECUTORS.register(EXECUTOR, InstantExecutor)


class TimedOptimizer:
    """The study's optimizer with its ask, tell and save timed; everything else passes through."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = {"ask": 0.0, "tell": 0.0, "save": 0.0}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _timed(self, key: str, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return getattr(self.inner, key)(*args)
        finally:
            self.seconds[key] += time.perf_counter() - t0

    def ask(self) -> Any:
        return self._timed("ask")

    def tell(self, proposal_id: int, values: Any) -> None:
        self._timed("tell", proposal_id, values)

    def save(self) -> None:
        self._timed("save")


def demo_shaped_study(folder: Path) -> Path:
    """The demo study's study.yaml over untrained checkpoints of the demo's shape (written once:
    the controller never reads a weight, only the headers)."""
    from evomerge.zoo import data, tasks
    from evomerge.zoo.build import write_study_yaml
    from evomerge.zoo.tokenizer import save_tokenizer
    from evomerge.zoo.train import ModelShape, new_model

    folder = Path(folder).resolve()
    for seed, name in enumerate(("base", *data.SKILLS)):
        out = folder / name
        if not (out / "model.safetensors").is_file():
            new_model(ModelShape(), seed).save_pretrained(str(out), safe_serialization=True)
            save_tokenizer(out)
    return write_study_yaml(folder, tasks.resolve_evals_dir(folder / "evals"), small=False)


def optimizer_section(name: str, study_optimizer: dict[str, Any]) -> dict[str, Any]:
    """The study's own optimizer section for its optimizer, the defaults for any other."""
    return dict(study_optimizer) if study_optimizer.get("name") == name else {"name": name}


def bench_one(
    study: Path,
    run_dir: Path,
    optimizer: str,
    *,
    trials: int,
    workers: int,
    seed: int = 0,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One study of `trials` instant candidates with `optimizer`; the timings of its loop."""
    from evomerge.commands.run import start_run
    from evomerge.config import load_study_config
    from evomerge.rebuild import open_optimizer
    from evomerge.study import Study
    from evomerge.study_plan import build_plan
    from evomerge.yaml_io import read_yaml

    register_instant()
    section = optimizer_section(optimizer, read_yaml(study).get("optimizer") or {})
    section.update(options or {})
    overrides = {
        "optimizer": section,
        "executor": {"kind": EXECUTOR, "workers": workers, "order_seed": seed},
        "budget": {"max_trials": trials},
        "fitness": {"fidelity": "full"},
        "device": "cpu",
        "seed": seed,
    }
    plan = build_plan(load_study_config(study, overrides))
    shutil.rmtree(run_dir, ignore_errors=True)
    store = start_run(run_dir, plan.config)
    opt = TimedOptimizer(open_optimizer(plan, store, [], resume=False))
    t0 = time.perf_counter()
    Study(store, plan, progress=False).run(optimizer=opt)  # type: ignore[arg-type]
    wall = time.perf_counter() - t0
    opt.close()
    ex = InstantExecutor.last
    assert ex is not None
    return summarize(
        optimizer,
        gaps=ex.gaps,
        cpu_gaps=ex.cpu_gaps,
        wall=wall,
        fitness_s=ex.fitness_s,
        optimizer_s=opt.seconds,
        trials=trials,
        genes=len(plan.space.dimensions()),
        workers=workers,
        run_dir=store.dir,
    )


def summarize(
    optimizer: str,
    *,
    gaps: Sequence[float],
    cpu_gaps: Sequence[float],
    wall: float,
    fitness_s: float,
    optimizer_s: dict[str, float],
    trials: int,
    genes: int,
    workers: int,
    run_dir: Path,
) -> dict[str, Any]:
    """ms per trial: mean, percentiles, and the mean in each window of WINDOWS."""
    ms = [1e3 * g for g in gaps]
    cpu = [1e3 * g for g in cpu_gaps]
    qs = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99

    def windows(values: list[float]) -> dict[str, float]:
        return {
            f"{a}-{b}": round(statistics.fmean(values[a:b]), 3)
            for a, b in WINDOWS
            if len(values) >= b
        }

    opt_ms = {k: round(1e3 * v / trials, 3) for k, v in optimizer_s.items()}
    return {
        "optimizer": optimizer,
        "trials": trials,
        "genes": genes,
        "workers": workers,
        "wall_s": round(wall, 3),
        "wall_ms_per_trial": round(1e3 * (wall - fitness_s) / trials, 3),
        "measured": len(ms),  # trials whose loop time was measured (all of them)
        "mean_ms": round(statistics.fmean(ms), 3) if ms else None,
        "p50_ms": round(qs[49], 3),
        "p90_ms": round(qs[89], 3),
        "p99_ms": round(qs[98], 3),
        "max_ms": round(max(ms), 3) if ms else None,
        "windows_ms": windows(ms),
        "cpu_mean_ms": round(statistics.fmean(cpu), 3) if cpu else None,
        "cpu_windows_ms": windows(cpu),
        "optimizer_ms_per_trial": opt_ms,
        "run_dir": str(run_dir),
    }


def run_controller_bench(
    work: Path,
    *,
    optimizers: Sequence[str] | None = None,
    trials: int = 2000,
    workers: int = 8,
    study: Path | None = None,
) -> dict[str, Any]:
    """Every registered optimizer (or `optimizers`) through `trials` instant candidates."""
    from evomerge.errors import ConfigError
    from evomerge.optimizers import OPTIMIZERS

    if trials < 1 or workers < 1:
        raise ConfigError(
            f"controller bench: needs trials >= 1 and workers >= 1, got {trials}, {workers}"
        )
    names = list(optimizers) if optimizers else OPTIMIZERS.names()
    for name in names:
        OPTIMIZERS.get(name, where="--optimizers")  # an unknown name: "did you mean", at once
    work = Path(work).resolve()
    study = Path(study) if study is not None else demo_shaped_study(work / "models")
    rows = [
        bench_one(study, work / "runs" / name, name, trials=trials, workers=workers)
        for name in names
    ]
    return {
        "label": "controller microbenchmark: instant fitness, no merge or scoring",
        "study": str(study),
        "trials": trials,
        "workers": workers,
        "target_ms": 50.0,
        "rows": rows,
    }


def print_controller(report: dict[str, Any]) -> None:
    rows = report["rows"]
    genes = rows[0]["genes"] if rows else 0
    print(
        f"controller ({report['label']}): {report['trials']} trials, {report['workers']} "
        f"simulated workers, {genes} genes; ms per trial (ask + tell + persist)"
    )
    wins = [f"{a}-{b}" for a, b in WINDOWS]
    head = f"{'optimizer':<15}{'mean':>8}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}"
    print(head + "".join(f"{w:>11}" for w in wins) + f"{'optimizer':>11}")
    for r in rows:
        own = sum(r["optimizer_ms_per_trial"].values())
        line = f"{r['optimizer']:<15}" + "".join(
            f"{r[k]:>8.2f}" for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms", "max_ms")
        )
        line += "".join(f"{r['windows_ms'].get(w, float('nan')):>11.2f}" for w in wins)
        print(line + f"{own:>11.2f}")

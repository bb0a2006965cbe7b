"""The controller alone: ask + tell + persist per trial, through the real study loop.

A labelled microbenchmark. `Study.run` drives a real run directory (RunStore, scheduler,
trials.jsonl appended with fsync, the optimizer's state saved after every ask and tell, best/),
but candidates go to the `instant` executor registered here: K simulated workers whose
"evaluation" is a deterministic cheap function of the recipe (no merge, no scoring, about 0.1 ms),
finishing one at a time in a seeded random order, as asynchronous workers do. Everything the loop
does between two results is then the controller's own cost: the gap between one `wait()`
returning and the next `wait()` starting is one trial's record + tell + persist + ask, timed
here without any hook in the loop. Where that time goes is timed by thin wrappers around the
objects the loop is handed (no hook in the loop either): the optimizer's ask, tell and save (the
loop saves after every ask and every tell), the run store's trials.jsonl append (with its fsync)
and best/ rewrite, and the rest (the study's bookkeeping, the scheduler, decoding the recipe).

The space is the demo study's task arithmetic (`evomerge zoo`: 3 sources, 4 layers) made
per-layer (granularity 1: a weight per source per layer and for the embeddings/norm/head group,
3 x (4 + 1) = 15 genes; the demo's own granularity 2 has 9), the larger space a per-layer search
asks the controller for, on untrained checkpoints of the demo's shape, written once into the
bench's work folder (the controller never reads a weight).
"""

from __future__ import annotations

import itertools
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
#: what the wrappers time, per trial (seconds, cumulative over the run); the clock also counts
#: the lines appended to trials.jsonl ("lines"), which places each gap among the trials
PARTS = ("ask", "tell", "save", "append", "best")


def windows(trials: int) -> tuple[tuple[int, int], ...]:
    """The growth columns, trials [a, b): the first, middle and last w = min(100, trials // 10);
    at 2,000 trials 0-100, 900-1000 and 1900-2000."""
    w = max(1, min(100, trials // 10))
    mid = max(w, trials // 2)
    return ((0, w), (mid - w, mid), (trials - w, trials))


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
    clock_for_next: dict[str, float] | None = None  # the bench's clock, for the next one built

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
        #: the wrappers' cumulative seconds (set by the bench); `split[i]` is their share of gap i
        self.clock = InstantExecutor.clock_for_next or dict.fromkeys((*PARTS, "lines"), 0.0)
        self.split: list[dict[str, float]] = []  # per gap: PARTS' seconds, "lines" written
        self.fitness_s = 0.0
        self._returned: tuple[float, float, dict[str, float]] | None = None
        InstantExecutor.last = self

    def submit(self, job: Job) -> None:
        self.jobs.append(job)

    def in_flight(self) -> int:
        return len(self.jobs)

    def _gap(self) -> None:
        """The loop's time since the last result: that result's record, tell, save, next ask."""
        if self._returned is not None:
            wall, cpu, clock = self._returned
            self.gaps.append(time.perf_counter() - wall)
            self.cpu_gaps.append(time.process_time() - cpu)
            self.split.append({k: self.clock[k] - clock[k] for k in (*PARTS, "lines")})
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
        self._returned = (time.perf_counter(), time.process_time(), dict(self.clock))
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


def timed(fn: Any, clock: dict[str, float], key: str) -> Any:
    """`fn`, adding its wall seconds to clock[key] at every call."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[key] += time.perf_counter() - t0

    return wrapper


def counted(fn: Any, clock: dict[str, float], key: str) -> Any:
    """`fn` timed into clock[key], its calls counted in clock["lines"]."""
    inner = timed(fn, clock, key)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        clock["lines"] += 1
        return inner(*args, **kwargs)

    return wrapper


class TimedOptimizer:
    """The study's optimizer with its ask, tell and save timed; everything else passes through."""

    def __init__(self, inner: Any, clock: dict[str, float]) -> None:
        self.inner = inner
        self.seconds = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _timed(self, key: str, *args: Any) -> Any:
        return timed(getattr(self.inner, key), self.seconds, key)(*args)

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
    overrides: dict[str, Any] | None = None,
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
        **(overrides or {}),
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
    clock = dict.fromkeys((*PARTS, "lines"), 0.0)
    store.append = counted(store.append, clock, "append")  # type: ignore[method-assign]
    store.write_best = timed(store.write_best, clock, "best")  # type: ignore[method-assign]
    opt = TimedOptimizer(open_optimizer(plan, store, [], resume=False), clock)
    study_loop = Study(store, plan, progress=False)
    InstantExecutor.clock_for_next = clock
    t0 = time.perf_counter()
    try:
        study_loop.run(optimizer=opt)  # type: ignore[arg-type]
    finally:
        InstantExecutor.clock_for_next = None
    wall = time.perf_counter() - t0
    opt.close()
    ex = InstantExecutor.last
    assert ex is not None and ex.clock is clock
    return summarize(
        optimizer,
        gaps=ex.gaps,
        cpu_gaps=ex.cpu_gaps,
        split=ex.split,
        wall=wall,
        fitness_s=ex.fitness_s,
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
    split: Sequence[dict[str, float]],
    wall: float,
    fitness_s: float,
    trials: int,
    genes: int,
    workers: int,
    run_dir: Path,
) -> dict[str, Any]:
    """ms per trial: in each window of `windows(trials)` the loop's time over the gaps that
    recorded those trials divided by the trials (a gap that records a duplicate as well
    records two), percentiles of the gaps overall and in the last window, and where the time
    went (PARTS and the rest of the loop), overall and in each window."""
    ms = [1e3 * g for g in gaps]
    cpu = [1e3 * g for g in cpu_gaps]
    parts = {k: [1e3 * s[k] for s in split] for k in PARTS}
    parts["other"] = [g - sum(parts[k][i] for k in PARTS) for i, g in enumerate(ms)]
    lines = [int(s["lines"]) for s in split]
    at = list(itertools.accumulate(lines))  # trials recorded when each gap ended
    wins = [(a, b) for a, b in windows(trials) if at and at[-1] >= b]
    members = {(a, b): [i for i, n in enumerate(at) if a < n <= b] for a, b in wins}

    def by_window(values: list[float]) -> dict[str, float]:
        out = {}
        for (a, b), idx in members.items():
            recorded = sum(lines[i] for i in idx)
            out[f"{a}-{b}"] = round(sum(values[i] for i in idx) / max(1, recorded), 3)
        return out

    def pct(values: list[float], q: int) -> float:
        if len(values) < 2:
            return round(values[0], 3) if values else float("nan")
        return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 3)

    last = [ms[i] for i in members[wins[-1]]] if wins else ms
    return {
        "optimizer": optimizer,
        "trials": trials,
        "genes": genes,
        "workers": workers,
        "wall_s": round(wall, 3),
        "wall_ms_per_trial": round(1e3 * (wall - fitness_s) / trials, 3),
        "measured": sum(lines),  # trials whose loop time was measured (all of them)
        "gaps": len(ms),  # results the loop handled (a duplicate is recorded without one)
        "mean_ms": round(sum(ms) / max(1, sum(lines)), 3) if ms else None,
        "p50_ms": pct(ms, 50),
        "p95_ms": pct(ms, 95),
        "p99_ms": pct(ms, 99),
        "max_ms": round(max(ms), 3) if ms else None,
        "windows_ms": by_window(ms),
        "last_window_p95_ms": pct(last, 95),
        "cpu_mean_ms": round(sum(cpu) / max(1, sum(lines)), 3) if cpu else None,
        "cpu_windows_ms": by_window(cpu),
        # ms per trial of each part, overall and per window (they add up to mean_ms)
        "parts_ms": {k: round(sum(v) / max(1, sum(lines)), 3) for k, v in parts.items()},
        "parts_windows_ms": {k: by_window(v) for k, v in parts.items()},
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
    per_layer = {} if study is not None else {"search_space.granularity": 1}
    study = Path(study) if study is not None else demo_shaped_study(work / "models")
    rows = [
        bench_one(
            study, work / "runs" / name, name, trials=trials, workers=workers, overrides=per_layer
        )
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
    """One line per optimizer: ms per trial in each window, p95 in the last, and the last
    window's time split into ask / tell / save / append (+ best/) / the rest of the loop."""
    rows = report["rows"]
    genes = rows[0]["genes"] if rows else 0
    print(
        f"controller ({report['label']}): {report['trials']} trials, {report['workers']} "
        f"simulated workers, {genes} genes; wall ms per trial of ask + tell + persist "
        f"(target < {report['target_ms']:g} ms)"
    )
    wins = [f"{a}-{b}" for a, b in windows(report["trials"])]
    split = ("ask", "tell", "save", "append", "other")
    print(
        f"{'optimizer':<15}"
        + "".join(f"{w:>11}" for w in wins)
        + f"{'p95 last':>10}  "
        + "".join(f"{k:>8}" for k in split)
        + "  (split: last window)"
    )
    for r in rows:
        line = f"{r['optimizer']:<15}"
        line += "".join(f"{r['windows_ms'].get(w, float('nan')):>11.2f}" for w in wins)
        line += f"{r['last_window_p95_ms']:>10.2f}  "
        last = {k: v.get(wins[-1], float("nan")) for k, v in r["parts_windows_ms"].items()}
        last["append"] += last.pop("best")  # trials.jsonl and best/: the run store's share
        print(line + "".join(f"{last[k]:>8.2f}" for k in split))

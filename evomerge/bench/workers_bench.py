"""Candidates per minute on this machine: in process, and on a local Ray with 1 and 2 workers.

Every measurement evaluates the same seeded random candidates of the demo study (merge in place,
then score), with as many in flight as there are workers, the way the study loop dispatches them.
Worker start (Ray start, actors loading sources and building tasks) and one warm-up round are
timed apart from the candidates. The per-candidate split between merge and scoring comes from
`Outcome.seconds`. On CPU each Ray worker runs one thread, so 1 versus 2 workers measures parallel
workers rather than threads; the in-process row uses torch's default threads.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evomerge.recipe import Recipe
    from evomerge.study_plan import StudyPlan

WORKER_COUNTS = (1, 2)


def ensure_zoo(zoo_dir: Path) -> Path:
    """The demo zoo's study.yaml, building the zoo first when it is missing (reused otherwise)."""
    from evomerge.zoo import build_zoo

    return build_zoo(zoo_dir, progress=False).study


def bench_recipes(plan: StudyPlan, n: int, seed: int = 0, sigma: float = 0.15) -> list[Recipe]:
    """`n` candidates like a search's first generation: the start genome plus seeded Gaussian steps
    of `sigma` x each gene's range, clipped (random genomes give degenerate models that answer
    in one token and would flatter the scoring time)."""
    rng = random.Random(seed)
    recipes = []
    for _ in range(n):
        genome = dict(plan.x0)
        for d in plan.space.dimensions():
            if not d.choices:
                step = rng.gauss(0.0, sigma * (d.high - d.low))
                genome[d.name] = min(max(float(genome[d.name]) + step, d.low), d.high)
        recipes.append(plan.space.decode(genome))
    return recipes


def drive(executor: Any, recipes: list[Recipe], warmup: bool = True) -> tuple[float, list[Any]]:
    """Evaluate all recipes keeping `executor.workers` in flight; returns (seconds, outcomes).

    With `warmup`, one untimed round first gives every worker a candidate (first-call costs).
    """
    from evomerge.executors import Job

    if warmup:
        for key, recipe in enumerate(recipes[: executor.workers]):
            executor.submit(Job(-1 - key, recipe))
        while executor.in_flight():
            executor.wait()
    todo = list(enumerate(recipes))
    outcomes = []
    t0 = time.perf_counter()
    while todo or executor.in_flight():
        while todo and executor.in_flight() < executor.workers:
            key, recipe = todo.pop(0)
            executor.submit(Job(key, recipe))
        outcomes.extend(r.outcome for r in executor.wait())
    return time.perf_counter() - t0, outcomes


def _placement(device: str, workers: int) -> dict[str, Any]:
    """On one GPU two workers share it (gpus_per_worker 0.5); on CPU each worker runs one thread,
    so 1 versus 2 workers measures parallel workers, not more threads in one worker."""
    if not device.startswith("cuda"):
        return {"cpus_per_worker": 1}
    import torch

    return {"gpus_per_worker": min(1.0, torch.cuda.device_count() / workers)}


def run_workers_bench(zoo_dir: Path, *, device: str, candidates: int) -> dict[str, float]:
    from evomerge.config import load_study_config
    from evomerge.executors import make_executor
    from evomerge.study_plan import build_plan

    study = ensure_zoo(Path(zoo_dir))
    t0 = time.perf_counter()
    plan = build_plan(load_study_config(str(study), {"device": device}))
    recipes = bench_recipes(plan, candidates)
    report: dict[str, float] = {"candidates": float(candidates)}
    report["prepare_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with make_executor("local", plan.worker_spec) as local:
        report["local_start_s"] = time.perf_counter() - t0
        seconds, outcomes = drive(local, recipes)
    report["local_candidates_per_min"] = 60 * candidates / seconds
    failed = sum(o.error is not None for o in outcomes)

    for workers in WORKER_COUNTS:
        t0 = time.perf_counter()
        ex = make_executor("ray", plan.worker_spec, workers=workers, **_placement(device, workers))
        try:
            report[f"ray{workers}_start_s"] = time.perf_counter() - t0
            seconds, outcomes = drive(ex, recipes)
        finally:
            ex.close()
        report[f"ray{workers}_candidates_per_min"] = 60 * candidates / seconds
        failed += sum(o.error is not None for o in outcomes)
        if workers == 1:
            for part in ("merge", "score", "forward", "harness", "total"):
                values = [o.seconds[part] for o in outcomes if part in o.seconds]
                if values:
                    report[f"per_candidate_{part}_s"] = statistics.mean(values)
            report["per_candidate_dispatch_s"] = seconds / candidates - report.get(
                "per_candidate_total_s", 0.0
            )
    first, last = WORKER_COUNTS[0], WORKER_COUNTS[-1]
    report[f"speedup_ray{last}_vs_ray{first}"] = (
        report[f"ray{last}_candidates_per_min"] / report[f"ray{first}_candidates_per_min"]
    )
    report["failed_candidates"] = float(failed)
    return {k: round(v, 4) for k, v in report.items()}

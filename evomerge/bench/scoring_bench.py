"""Per-candidate time on the demo zoo: our worker (in-place merge + resident scorer) against a
fresh `lm_eval.simple_evaluate` per candidate, same model and tasks, same run.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from evomerge.scoring import ScoringSettings


def bench_scoring(
    model: Any, tokenizer: Any, config: ScoringSettings, repeats: int = 3, *, fresh: bool = True
) -> dict[str, Any]:
    """Times `repeats` candidates through one Scorer against `repeats` fresh simple_evaluate
    calls, interleaved so that a change in machine load hits both alike.

    Returns seconds (medians over the repeats, and the single runs): setup_s (building the
    scorer, once), score_s per candidate, its split forward_s / overhead_s / overhead_frac,
    fresh_s, speedup (fresh_s / score_s); *_cpu_s are process CPU times, steadier than wall
    time on a shared machine; metrics_match says the two paths gave identical metrics.
    """
    from evomerge.bench.scoring_reference import fresh_evaluate
    from evomerge.scoring import Scorer

    wall, cpu = time.perf_counter(), time.process_time()
    scorer = Scorer(model, tokenizer, config, fitness=False)
    setup_s = time.perf_counter() - wall
    runs, cpu_runs, fresh_runs, fresh_cpu, fresh_metrics = [], [], [], [], None
    for _ in range(max(1, repeats)):
        cpu = time.process_time()
        runs.append(scorer.score())
        cpu_runs.append(time.process_time() - cpu)
        if fresh:
            wall, cpu = time.perf_counter(), time.process_time()
            fresh_metrics = fresh_evaluate(model, tokenizer, config)
            fresh_runs.append(time.perf_counter() - wall)
            fresh_cpu.append(time.process_time() - cpu)
    med = statistics.median
    report: dict[str, Any] = {
        "tasks": list(config.tasks),
        "repeats": len(runs),
        "setup_s": setup_s,
        "score_s": med(r.seconds for r in runs),
        "forward_s": med(r.forward_seconds for r in runs),
        "lm_s": med(r.lm_seconds for r in runs),
        "harness_s": med(r.harness_seconds for r in runs),
        "overhead_s": med(r.overhead_seconds for r in runs),
        "overhead_frac": med(r.overhead_seconds / r.seconds for r in runs if r.seconds > 0),
        "score_cpu_s": med(cpu_runs),
        "n_forward": runs[-1].n_forward,
        "score_s_runs": [r.seconds for r in runs],
        "metrics": runs[-1].metrics,
    }
    if fresh:
        report["fresh_s"] = med(fresh_runs)
        report["fresh_cpu_s"] = med(fresh_cpu)
        report["fresh_s_runs"] = fresh_runs
        report["speedup"] = report["fresh_s"] / report["score_s"]
        report["speedup_cpu"] = report["fresh_cpu_s"] / max(report["score_cpu_s"], 1e-9)
        report["metrics_match"] = fresh_metrics == runs[-1].metrics
    return report


def run_scoring_bench(zoo_dir: Path, *, device: str, candidates: int = 5) -> dict[str, Any]:
    import torch

    from evomerge.config import load_study_config
    from evomerge.study_plan import build_plan
    from evomerge.worker import Worker
    from evomerge.zoo import build_zoo

    build_zoo(zoo_dir, progress=False)
    config = load_study_config(zoo_dir / "study.yaml", {"device": device})
    plan = build_plan(config)
    worker = Worker(plan.worker_spec)
    recipe = plan.space.decode(plan.x0)
    merge_s = sorted(worker.merger.apply(recipe) for _ in range(candidates))
    settings = plan.worker_spec.scoring
    with torch.no_grad():
        res = bench_scoring(worker.model, worker.tokenizer, settings, repeats=candidates)
    outcome = worker.evaluate(recipe)
    merge = merge_s[len(merge_s) // 2]
    per_candidate = merge + res["score_s"]
    return {
        "tasks": ", ".join(settings.tasks),
        "candidate_s (merge + score)": round(per_candidate, 3),
        "fresh simple_evaluate_s": round(res["fresh_s"], 3),
        "speedup vs fresh": round(res["fresh_s"] / per_candidate, 2),
        "merge_s": round(merge, 4),
        "forward_s": round(res["forward_s"], 3),
        "harness + lm-eval request code_s": round(res["overhead_s"], 3),
        "non-forward share of candidate": round(
            (per_candidate - res["forward_s"]) / per_candidate, 3
        ),
        "scorer setup_s (once per worker)": round(res["setup_s"], 2),
        "metrics equal to simple_evaluate": bool(res["metrics_match"]),
        "worker load_s (once)": round(worker.load_seconds, 2),
        "fitness of start recipe": outcome.scores,
    }

"""Per-candidate time on the demo zoo: our worker (in-place merge + resident scorer) against a
fresh `lm_eval.simple_evaluate` per candidate, same model and tasks, same run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_scoring_bench(zoo_dir: Path, *, device: str, candidates: int = 5) -> dict[str, Any]:
    import torch

    from evomerge.config import load_study_config
    from evomerge.scoring import ScoringConfig, bench_scoring
    from evomerge.study import prepare
    from evomerge.worker import Worker
    from evomerge.zoo import build_zoo

    build_zoo(zoo_dir, progress=False)
    config = load_study_config(zoo_dir / "study.yaml", {"device": device})
    prepared = prepare(config)
    worker = Worker(prepared.worker_spec)
    recipe = prepared.space.decode(prepared.x0).to_dict()
    merge_s = sorted(
        worker.merger.apply(prepared.space.decode(prepared.x0)) for _ in range(candidates)
    )
    cfg = ScoringConfig(**prepared.worker_spec.scoring)
    with torch.no_grad():
        res = bench_scoring(worker.model, worker.tokenizer, cfg, repeats=candidates)
    outcome = worker.evaluate(recipe)
    merge = merge_s[len(merge_s) // 2]
    per_candidate = merge + res["score_s"]
    return {
        "tasks": ", ".join(cfg.tasks),
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

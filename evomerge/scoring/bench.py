"""Per-candidate time of the resident scorer against a fresh `simple_evaluate` per candidate.

`fresh_evaluate` is also the independent reference the tests compare the scorer with: it is the
plain lm-eval path (new HFLM wrapper, new TaskManager, `simple_evaluate`) on the same model.
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time
from pathlib import Path
from typing import Any

from evomerge.scoring.catalog import check_include_paths, normalize_metrics, task_manager
from evomerge.scoring.config import ScoringConfig


def fresh_evaluate(
    model: Any, tokenizer: Any, config: ScoringConfig
) -> dict[str, dict[str, float]]:
    """What a naive search loop does per candidate: wrap, index tasks, `simple_evaluate`."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from evomerge.scoring.scorer import (
        _device_of,
        _quiet,
        _without_custom_dataset_hint,
        seeded,
    )

    paths = check_include_paths(config.include_paths)
    local = task_manager(paths, False).task_index
    builtins = any(t not in local and not Path(t).is_file() for t in config.tasks)
    with (
        seeded(config.seed, _device_of(model)),
        _quiet("lm_eval.models.huggingface"),
        _without_custom_dataset_hint(),
        contextlib.redirect_stderr(io.StringIO()),  # lm-eval's own request bars
    ):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size)
        tm = TaskManager(include_path=list(paths) or None, include_defaults=builtins)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(config.tasks),
            task_manager=tm,
            limit=config.limit,
            num_fewshot=config.num_fewshot,
            batch_size=config.batch_size,
            apply_chat_template=config.apply_chat_template,
            fewshot_as_multiturn=config.apply_chat_template,
            fewshot_random_seed=config.fewshot_seed,
            torch_random_seed=config.seed,
            bootstrap_iters=0,
            log_samples=False,
        )
    return normalize_metrics(out["results"])


def bench_scoring(
    model: Any, tokenizer: Any, config: ScoringConfig, repeats: int = 3, *, fresh: bool = True
) -> dict[str, Any]:
    """Times `repeats` candidates through one Scorer against `repeats` fresh simple_evaluate
    calls, interleaved so that a change in machine load hits both alike.

    Returns seconds (medians over the repeats, and the single runs): setup_s (building the
    scorer, once), score_s per candidate, its split forward_s / overhead_s / overhead_frac,
    fresh_s, speedup (fresh_s / score_s); *_cpu_s are process CPU times, steadier than wall
    time on a shared machine; metrics_match says the two paths gave identical metrics.
    """
    from evomerge.scoring.scorer import Scorer

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

"""lm-eval in process, on the worker's resident model.

`Scorer(model, tokenizer, ScoringSettings(tasks=...))` builds tasks, datasets and requests once;
`scorer.score()` reruns only the forward passes and metrics after each in-place weight swap.
`check_tasks(config)` validates task names, include paths and metrics without a model.
Importing this package is cheap: lm_eval and torch load when a scorer or check needs them.
lm-eval's internals are used in `evomerge.scoring.lm_eval_adapter` only; the plain
`simple_evaluate` path the scorer is compared with is `evomerge.bench.scoring_reference`.
"""

from __future__ import annotations

# The user's HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are respected (evomerge sets neither): a
# built-in task's dataset downloads unless the user or the test suite turned downloads off.
from evomerge.scoring.catalog import check_tasks, describe_tasks
from evomerge.scoring.config import (
    PUBLIC_BENCHMARKS,
    PublicBenchmarkWarning,
    ScoreResult,
    ScoringSettings,
    public_benchmarks,
)
from evomerge.scoring.scorer import Scorer

__all__ = [
    "PUBLIC_BENCHMARKS",
    "PublicBenchmarkWarning",
    "ScoreResult",
    "Scorer",
    "ScoringSettings",
    "check_tasks",
    "describe_tasks",
    "public_benchmarks",
]

"""Scoring config and result types. No lm-eval or torch import here: cheap to import anywhere."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from evomerge.errors import ConfigError

# Test sets people report numbers on. Searching a merge on them and then reporting them is
# optimizing on the test set; a warning, since a user may do it knowingly (e.g. a demo).
PUBLIC_BENCHMARKS = (
    "mmlu",
    "hellaswag",
    "arc_easy",
    "arc_challenge",
    "ai2_arc",
    "gsm8k",
    "truthfulqa",
    "winogrande",
    "piqa",
    "boolq",
    "openbookqa",
    "lambada",
    "bbh",
    "gpqa",
    "ifeval",
    "humaneval",
    "mbpp",
    "minerva_math",
    "hendrycks_math",
    "leaderboard",
)


class PublicBenchmarkWarning(UserWarning):
    """A fitness task is a public benchmark's test set: scores on it are no longer held out."""


def public_benchmarks(tasks: Iterable[str]) -> list[str]:
    """The names in `tasks` that are (subtasks of) well-known public benchmarks."""
    return [
        t
        for t in tasks
        if any(t == b or t.startswith((b + "_", b + ":")) for b in PUBLIC_BENCHMARKS)
    ]


def warn_public_benchmarks(tasks: Iterable[str]) -> None:
    found = public_benchmarks(tasks)
    if found:
        warnings.warn(
            f"fitness tasks {', '.join(found)} are public benchmark test sets: a merge searched "
            "on them will look better on them than it is; report held-out tasks instead",
            PublicBenchmarkWarning,
            stacklevel=3,
        )


@dataclass(frozen=True)
class ScoringConfig:
    """What to score and how; one scorer builds these tasks once and reuses them."""

    tasks: tuple[str, ...]  # lm-eval task, group or tag names, or paths to task YAML files
    include_paths: tuple[str, ...] = ()  # folders of task YAMLs (our evals/)
    limit: int | float | None = None  # first N docs per task (a float < 1: that fraction)
    num_fewshot: int | None = None  # None: each task's own default (0 if it has none)
    batch_size: int = 16
    apply_chat_template: bool = False  # few-shot examples then become a multi-turn chat
    fewshot_seed: int = 1234  # lm-eval's default, so numbers match simple_evaluate
    seed: int = 1234  # torch seed for sampled generation, reset for every candidate

    def __post_init__(self) -> None:
        tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks)
        paths = (
            (self.include_paths,)
            if isinstance(self.include_paths, str)
            else tuple(self.include_paths)
        )
        object.__setattr__(self, "tasks", tasks)
        object.__setattr__(self, "include_paths", tuple(str(p) for p in paths))
        if not tasks or any(not isinstance(t, str) or not t.strip() for t in tasks):
            raise ConfigError(f"scoring tasks: need one or more task names, got {list(tasks)!r}")
        dup = sorted({t for t in tasks if tasks.count(t) > 1})
        if dup:
            raise ConfigError(f"scoring tasks: {', '.join(dup)} listed more than once")
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise ConfigError(
                f"scoring batch_size must be an integer >= 1, got {self.batch_size!r}"
            )
        if self.limit is not None and (
            isinstance(self.limit, bool)
            or not isinstance(self.limit, (int, float))
            or not math.isfinite(self.limit)
            or self.limit <= 0
            or (isinstance(self.limit, float) and self.limit >= 1 and not self.limit.is_integer())
        ):
            raise ConfigError(
                f"scoring limit must be a count >= 1 or a fraction in (0, 1), got {self.limit!r}"
            )
        if self.num_fewshot is not None and (
            isinstance(self.num_fewshot, bool)
            or not isinstance(self.num_fewshot, int)
            or self.num_fewshot < 0
        ):
            raise ConfigError(
                f"scoring num_fewshot must be an integer >= 0, got {self.num_fewshot!r}"
            )


@dataclass(frozen=True)
class ScoreResult:
    """Metrics of one candidate, and where its time went."""

    metrics: dict[
        str, dict[str, float]
    ]  # {task: {metric: value}}; 'acc', 'exact_match,strict-match'
    seconds: float  # wall time of Scorer.score()
    forward_seconds: float  # inside the model's forward calls (synchronized on GPU)
    lm_seconds: float  # inside lm-eval's request calls: forward + batching, log-softmax, decoding
    n_forward: int  # model forward calls (batches, and decoding steps for generation)
    samples: dict[str, int] = field(default_factory=dict)  # docs scored per task

    @property
    def overhead_seconds(self) -> float:
        """Everything that is not a forward pass: what reusing the harness should make small."""
        return max(self.seconds - self.forward_seconds, 0.0)

    @property
    def harness_seconds(self) -> float:
        """Outside the LM calls: resetting, filters, per-doc metrics, aggregation."""
        return max(self.seconds - self.lm_seconds, 0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["overhead_seconds"] = self.overhead_seconds
        d["harness_seconds"] = self.harness_seconds
        return d

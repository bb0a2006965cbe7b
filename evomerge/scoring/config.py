"""Scoring config and result types. No lm-eval or torch import here: cheap to import anywhere."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evomerge.errors import ConfigError

if TYPE_CHECKING:
    from evomerge.items import ItemScores

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


def _names(value: Any) -> tuple[Any, ...]:
    """One string is one name (not its characters); any other iterable gives its items."""
    if isinstance(value, str):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        return (value,) if value is not None else ()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ScoringSettings(BaseModel):
    """What to score and how; one scorer builds these tasks once and reuses them.

    Built once (by the study plan or `evomerge eval`) and passed as it is, to Ray actors too:
    frozen, hashable and picklable. Bad values raise ConfigError naming the setting.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tasks: tuple[str, ...] = Field(
        description="lm-eval task, group or tag names, or paths to task YAML files; a group "
        "that aggregates its tasks is reported as one entry, so the objective can name it"
    )
    include_paths: tuple[str, ...] = Field(
        default=(),
        description="folders of task YAMLs (our evals/), searched first: indexing lm-eval's "
        "built-in tasks takes tens of seconds, so it happens only for a name not found here",
    )
    limit: int | float | None = Field(
        default=None,
        description="first N docs per task (a float < 1: that fraction, rounded up); lm-eval "
        "takes the first docs, not a sample, so every candidate is scored on the same ones",
    )
    num_fewshot: int | None = Field(
        default=None,
        description="few-shot examples per prompt; None keeps each task's own default (0 if it "
        "has none), and a task pinned to 0 keeps 0, as simple_evaluate does",
    )
    batch_size: int = Field(
        default=16,
        description="requests per forward pass; a fixed size lets the scorer plan the "
        "log-likelihood batches once instead of per candidate",
    )
    apply_chat_template: bool = Field(
        default=False,
        description="format prompts with the tokenizer's chat template, for chat models; the "
        "few-shot examples then become a multi-turn chat",
    )
    fewshot_seed: int = Field(
        default=1234,
        description="seed of the few-shot example sampler; lm-eval's default, so the numbers "
        "match simple_evaluate's",
    )
    seed: int = Field(
        default=1234,
        description="torch seed for sampled generation, reset before every candidate so that "
        "two candidates differ only by their weights",
    )

    def __init__(self, **data: Any) -> None:
        """Keyword construction as for a dataclass; ConfigError (not ValidationError) on bad
        values, with the message of the first rule broken."""
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(_first_message(exc)) from None

    @field_validator("tasks", mode="before")
    @classmethod
    def _check_tasks(cls, value: Any) -> tuple[str, ...]:
        tasks = _names(value)
        if not tasks or any(not isinstance(t, str) or not t.strip() for t in tasks):
            raise ConfigError(f"scoring tasks: need one or more task names, got {list(tasks)!r}")
        dup = sorted({t for t in tasks if tasks.count(t) > 1})
        if dup:
            raise ConfigError(f"scoring tasks: {', '.join(dup)} listed more than once")
        return tasks

    @field_validator("include_paths", mode="before")
    @classmethod
    def _paths_as_strings(cls, value: Any) -> tuple[str, ...]:
        return tuple(str(p) for p in _names(value))  # Path objects welcome

    @field_validator("batch_size", mode="before")
    @classmethod
    def _check_batch_size(cls, value: Any) -> int:
        if not _is_int(value) or value < 1:
            raise ConfigError(f"scoring batch_size must be an integer >= 1, got {value!r}")
        return value

    @field_validator("limit", mode="before")
    @classmethod
    def _check_limit(cls, value: Any) -> int | float | None:
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value <= 0
            or (isinstance(value, float) and value >= 1 and not value.is_integer())
        ):
            raise ConfigError(
                f"scoring limit must be a count >= 1 or a fraction in (0, 1), got {value!r}"
            )
        return value

    @field_validator("num_fewshot", mode="before")
    @classmethod
    def _check_num_fewshot(cls, value: Any) -> int | None:
        if value is not None and (not _is_int(value) or value < 0):
            raise ConfigError(f"scoring num_fewshot must be an integer >= 0, got {value!r}")
        return value


def _first_message(exc: ValidationError) -> str:
    """Our own rule's message where one failed, else pydantic's, prefixed with the setting."""
    errors = exc.errors()
    for err in errors:
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigError):
            return str(cause)
    err = errors[0]
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"scoring: unknown setting {where!r}; the settings are {', '.join(_FIELDS)}"
    if err["type"] == "missing":
        return f"scoring {where}: required (the task names to score)"
    msg = err["msg"][:1].lower() + err["msg"][1:]
    return f"scoring {where}: {msg} ({err.get('input')!r})"


_FIELDS = tuple(ScoringSettings.model_fields)


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
    items: ItemScores | None = None  # each scored document's own values, per task and metric

    @property
    def overhead_seconds(self) -> float:
        """Everything that is not a forward pass: what reusing the harness should make small."""
        return max(self.seconds - self.forward_seconds, 0.0)

    @property
    def harness_seconds(self) -> float:
        """Outside the LM calls: resetting, filters, per-doc metrics, aggregation."""
        return max(self.seconds - self.lm_seconds, 0.0)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "items"}
        d["overhead_seconds"] = self.overhead_seconds
        d["harness_seconds"] = self.harness_seconds
        return d

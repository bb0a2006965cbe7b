"""The ask/tell contract every search optimizer follows, and the registry that names them.

The study loop owns control: it asks for proposals, evaluates them wherever it likes, tells the
values back (to MAXIMIZE; `None` for a failed candidate) and calls `save()` after every ask and
every tell. `load()` restores exactly what `save()` wrote, so a resumed study continues the same
search: with the same seed and the same sequence of tells, the proposals (ids and params) are the
same as in an uninterrupted run. Proposals asked but not told before a crash come back from
`pending()` and are told like any other.

A state that is lost or unreadable is rebuilt from the run's record of evaluations: `replay()`
brings a fresh optimizer (same seed) to the state it had after them (`evomerge resume RUN
--rebuild-state`, evomerge/rebuild.py).

Optimizers see only `Dimension`s: a continuous range or a categorical choice (e.g. the merge
method of a layer group). How an optimizer encodes a choice is its own business; those that only
search continuous spaces (CMA-ES) give each choice a score in [0, 1] and decode the argmax
(`choice_scores` / `argmax_choice` below).
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from evomerge.errors import ConfigError, MissingPathError, RunDirError
from evomerge.options import PluginOptions
from evomerge.registry import Registry, did_you_mean

Params = dict[str, "float | str"]

#: scores a warm start gives a categorical encoded as per-choice scores: chosen, others
X0_CHOSEN, X0_OTHER = 0.6, 0.4


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: a float in [low, high], or one of `choices` when they are set."""

    name: str
    low: float = 0.0
    high: float = 1.0
    choices: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a search dimension needs a non-empty name")
        if self.choices is not None:
            if len(self.choices) == 0 or len(set(self.choices)) != len(self.choices):
                raise ConfigError(
                    f"dimension {self.name!r}: choices {list(self.choices)} must be non-empty "
                    "and unique"
                )
            object.__setattr__(self, "choices", tuple(str(c) for c in self.choices))
        elif not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ConfigError(
                f"dimension {self.name!r}: needs finite low < high, got [{self.low}, {self.high}]"
            )
        else:
            object.__setattr__(self, "low", float(self.low))
            object.__setattr__(self, "high", float(self.high))

    @property
    def categorical(self) -> bool:
        return self.choices is not None

    def to_unit(self, value: float) -> float:
        """[low, high] -> [0, 1]."""
        return (float(value) - self.low) / (self.high - self.low)

    def from_unit(self, u: float) -> float:
        """[0, 1] -> [low, high], clipped so a proposal never leaves the bounds."""
        return min(self.high, max(self.low, self.low + float(u) * (self.high - self.low)))


class OptimizerStateError(RunDirError):
    """An optimizer state that is missing, empty or unreadable (rebuildable from the trials)."""


class ReplayMismatchError(RunDirError):
    """Recorded evaluations that a fresh optimizer does not propose again in the same way."""


@dataclass(frozen=True)
class Told:
    """One recorded evaluation to replay: the proposal, its params, the values told (None: failed)."""

    proposal: int
    params: dict[str, float | str]
    values: tuple[float, ...] | None


@dataclass(frozen=True)
class Proposal:
    """A candidate to evaluate. `id` counts 0, 1, 2, ... in ask order and survives save/load."""

    id: int
    params: dict[str, float | str]


class Optimizer(ABC):
    """Ask/tell search over `dims` whose whole state lives in `state_dir`.

    Construct to start a new search (refuses a `state_dir` that already holds this optimizer's
    state); `load()` to continue one. Values told are maximized; `n_objectives` values each.
    """

    name: ClassVar[str]
    #: files in state_dir that hold this optimizer's state (the first one marks that a state exists)
    state_files: ClassVar[tuple[str, ...]]
    #: the options a study may set (`optimizer: {name: ..., <option>: ...}`), checked at load
    Options: ClassVar[type[PluginOptions]] = PluginOptions
    #: True where `ask` returns None until the outstanding proposals are told (one generation
    #: at a time): racing then races each generation as a whole (evomerge/racing.py)
    generational: ClassVar[bool] = False

    @classmethod
    def parse_options(cls, options: Mapping[str, Any] | None) -> PluginOptions:
        """Validated options; ConfigError naming the optimizer and the option otherwise."""
        return cls.Options.parse(options, f"optimizer {cls.name!r}")

    @classmethod
    def has_state(cls, state_dir: Path) -> bool:
        """Whether `state_dir` holds a state of this optimizer (a run to resume)."""
        return (Path(state_dir) / cls.state_files[0]).exists()

    @classmethod
    def check_objectives(cls, n_objectives: int) -> None:
        """Raise ConfigError when this optimizer cannot handle `n_objectives` (default: 1 only)."""
        if n_objectives > 1:
            raise ConfigError(
                f"optimizer {cls.name!r} optimizes one objective, but the study has "
                f"{n_objectives}; use optimizer.name: optuna_nsga2 (or optuna_tpe) for "
                "several objectives, or combine them into one with weights"
            )

    def __init__(
        self,
        dims: Sequence[Dimension],
        *,
        n_objectives: int = 1,
        seed: int = 0,
        options: Mapping[str, Any] | None = None,
        state_dir: Path,
        x0: Mapping[str, float | str] | None = None,
    ) -> None:
        self._setup(dims, n_objectives, seed, options, state_dir)
        if self.has_state(self.state_dir):
            raise RunDirError(
                f"{self.state_dir / self.state_files[0]} already exists: resume that run "
                "(load the optimizer) or start in a new run directory"
            )
        self._start(check_x0(self.dims, x0))

    @classmethod
    def load(
        cls,
        dims: Sequence[Dimension],
        *,
        n_objectives: int = 1,
        seed: int = 0,
        options: Mapping[str, Any] | None = None,
        state_dir: Path,
        x0: Mapping[str, float | str] | None = None,
    ) -> Optimizer:
        """Restore the state `save()` wrote; `x0` is ignored (it only matters at the start)."""
        self = cls.__new__(cls)
        self._setup(dims, n_objectives, seed, options, state_dir)
        path = self.state_dir / self.state_files[0]
        if not cls.has_state(self.state_dir):
            raise MissingPathError(f"no {cls.name} optimizer state at {path}: nothing to resume")
        if path.is_file() and path.stat().st_size == 0:  # opening it could even write to it
            raise OptimizerStateError(f"{path} is empty (0 bytes)")
        self._restore()  # OptimizerStateError when the files do not hold a state
        return self

    def _setup(self, dims, n_objectives, seed, options, state_dir) -> None:
        self.dims: tuple[Dimension, ...] = tuple(dims)
        if not self.dims:
            raise ConfigError("the search space has no dimensions: nothing to optimize")
        names = [d.name for d in self.dims]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"search dimensions named more than once: {dupes}")
        if int(n_objectives) < 1:
            raise ConfigError(f"n_objectives must be >= 1, got {n_objectives}")
        self.n_objectives = int(n_objectives)
        self.seed = int(seed)
        #: what the study set, as given (the resume signature compares it)
        self.options: dict[str, Any] = dict(options or {})
        self.settings = self.parse_options(self.options)
        self.state_dir = Path(state_dir)
        self.check_objectives(self.n_objectives)

    def signature(self) -> dict[str, Any]:
        """What must not change between a run and its resume."""
        return {
            "optimizer": self.name,
            "dims": [asdict(d) | {"choices": list(d.choices or []) or None} for d in self.dims],
            "n_objectives": self.n_objectives,
            "seed": self.seed,
            "options": json.loads(json.dumps(self.options, sort_keys=True, default=str)),
        }

    def check_signature(self, saved: Mapping[str, Any], where: Path) -> None:
        now = self.signature()
        for key, value in now.items():
            if saved.get(key) != value:
                raise ConfigError(
                    f"{where}: the run was started with {_change(key, saved.get(key), value)}; "
                    "resume with the run's own study.yaml or start a new run"
                )

    def replay(self, history: Sequence[Told]) -> None:
        """Bring this fresh optimizer to the state it had after `history`, the recorded
        evaluations in the order they were told: ask until each recorded proposal comes back,
        check that it is the one recorded, tell its values. Proposals asked and never recorded
        (in flight at a crash) stay pending, to be evaluated again.

        Exact for an optimizer whose proposals follow from its seed and the values told, in
        whatever order they were told among those outstanding (cma: within a generation).
        ReplayMismatchError when a proposal differs from the record (another seed, space or
        version of the optimizer, or an order of asks and tells that cannot be recovered)."""
        asked: dict[int, Proposal] = {}
        told: set[int] = set()
        for t in history:
            if t.proposal in told:
                raise ReplayMismatchError(f"proposal {t.proposal} is recorded twice")
            while t.proposal not in asked:
                prop = self.ask()
                if prop is None or prop.id > t.proposal:
                    raise ReplayMismatchError(
                        f"proposal {t.proposal} was recorded, but the replay never proposes it"
                        f" ({'it waits for tells never recorded' if prop is None else 'ids differ'})"
                    )
                asked[prop.id] = prop
            diff = params_difference(asked[t.proposal].params, t.params)
            if diff:
                raise ReplayMismatchError(f"proposal {t.proposal}: {diff}")
            self.tell(t.proposal, t.values)
            told.add(t.proposal)

    @abstractmethod
    def _start(self, x0: Params | None) -> None:
        """Fresh state; `x0` (validated, possibly partial) is where the search starts."""

    @abstractmethod
    def _restore(self) -> None:
        """Read the state files in `state_dir`."""

    @abstractmethod
    def ask(self) -> Proposal | None:
        """Next proposal, or None while the optimizer waits for outstanding tells."""

    @abstractmethod
    def tell(self, proposal_id: int, values: Sequence[float] | None) -> None:
        """Values to maximize (one per objective), or None for a failed candidate.

        A non-finite value counts as a failure. Telling a proposal that is not pending raises
        ValueError (a bug in the caller).
        """

    @abstractmethod
    def pending(self) -> list[Proposal]:
        """Proposals asked and not yet told, in id order."""

    @abstractmethod
    def save(self) -> None:
        """Persist the whole state into `state_dir` atomically."""

    @property
    def best(self) -> tuple[Proposal, tuple[float, ...]] | None:
        """The successful proposal with the highest first objective so far, with its values."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op unless resources are held
        """Release files or connections (optional)."""

    def _values(self, proposal_id: int, values: Sequence[float] | None) -> tuple[float, ...] | None:
        """Normalize told values: a tuple of n_objectives finite floats, or None for a failure."""
        if values is None:
            return None
        vals = tuple(float(v) for v in values)
        if len(vals) != self.n_objectives:
            raise ValueError(
                f"proposal {proposal_id}: told {len(vals)} values, the optimizer expects "
                f"{self.n_objectives} (one per objective)"
            )
        return vals if all(math.isfinite(v) for v in vals) else None


def params_difference(replayed: Mapping[str, Any], recorded: Mapping[str, Any]) -> str | None:
    """The first parameter where a replayed proposal differs from the recorded one, in words."""
    for name in [*recorded, *(k for k in replayed if k not in recorded)]:
        a, b = replayed.get(name), recorded.get(name)
        same = a == b
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            same = math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
        if not same:
            return f"the replay proposes {name} = {a!r}, trials.jsonl records {b!r}"
    return None


def _change(key: str, old: Any, new: Any) -> str:
    """What changed in a signature, short: dimension counts and the first name that differs."""
    if key == "dims" and isinstance(old, list) and isinstance(new, list):
        first = next(
            (i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b),
            min(len(old), len(new)),
        )
        name = (new[first] if first < len(new) else old[first]).get("name")
        return (
            f"another search space (dims: {len(old)} then, {len(new)} now; "
            f"the first that differs: {name!r})"
        )

    def short(v: Any) -> str:
        text = repr(v)
        return text if len(text) <= 80 else text[:77] + "..."

    return f"{key} = {short(old)}, now {short(new)}"


def check_x0(dims: Sequence[Dimension], x0: Mapping[str, float | str] | None) -> Params | None:
    """Validate a warm start: known names, floats inside their bounds, known choices."""
    if x0 is None:
        return None
    by_name = {d.name: d for d in dims}
    unknown = [k for k in x0 if k not in by_name]
    if unknown:
        raise ConfigError(
            f"warm start (x0) names unknown dimensions {unknown}{did_you_mean(unknown[0], by_name)}"
        )
    out: Params = {}
    for key, value in x0.items():
        dim = by_name[key]
        if dim.choices is not None:
            if value not in dim.choices:
                raise ConfigError(
                    f"warm start (x0) {key} = {value!r} is not one of {list(dim.choices)}"
                )
            out[key] = str(value)
        else:
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"warm start (x0) {key} = {value!r} is not a number") from None
            if not dim.low <= v <= dim.high:
                raise ConfigError(
                    f"warm start (x0) {key} = {v} is outside its bounds [{dim.low}, {dim.high}]"
                )
            out[key] = v
    return out


def choice_scores(
    choices: Sequence[str], chosen: str | None, high: float, low: float
) -> list[float]:
    """Encode a choice as one score per option: `high` for the chosen one, `low` for the rest."""
    if chosen is None:
        return [0.5 * (high + low)] * len(choices)
    return [high if c == chosen else low for c in choices]


def argmax_choice(choices: Sequence[str], scores: Sequence[float]) -> str:
    """Decode per-choice scores: the highest wins, ties go to the earlier choice."""
    best = max(range(len(choices)), key=lambda i: (float(scores[i]), -i))
    return choices[best]


#: Built-in entries are lazy (evomerge/optimizers/__init__.py); plugins register here or through
#: the `evomerge.optimizers` entry-point group.
OPTIMIZERS: Registry[type[Optimizer]] = Registry(
    "optimizer", Optimizer, classes=True, entry_points="evomerge.optimizers"
)


def register_optimizer(name: str) -> Callable[[type[Optimizer]], type[Optimizer]]:
    """Class decorator for plugins: register an Optimizer subclass under `name` (sets its name)."""

    def wrap(cls: type[Optimizer]) -> type[Optimizer]:
        if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
            raise TypeError(f"optimizer {name!r} must be an Optimizer subclass, got {cls!r}")
        cls.name = name
        OPTIMIZERS.register(name, cls)
        return cls

    return wrap

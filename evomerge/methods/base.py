"""The merge-method contract: declared parameters plus one pure tensor function.

A method sees one tensor name at a time. `MergeInput` gives it the base tensor (if any), the
source tensors and their deltas against the base (computed once, lazily, or supplied resident by a
worker), the per-model and global parameters with defaults filled in, and a seeded generator for
random methods. It returns the merged tensor in float compute precision; casting is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.errors import ConfigError
from evomerge.registry import Registry


@dataclass(frozen=True)
class Param:
    """One parameter a method declares, with its default and valid range."""

    name: str
    default: Any
    per_model: bool
    kind: type = float  # float, int or bool
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: the range is (low, high] (e.g. density)
    help: str = ""

    def check(self, value: Any, where: str) -> Any:
        """Validate and coerce a user value; raise ConfigError naming the place and the rule."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(
                    f"{where}: parameter {self.name!r} must be true or false, got {value!r}"
                )
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: parameter {self.name!r} must be a number, got {value!r}")
        value = self.kind(value)
        if value != value:  # NaN
            raise ConfigError(f"{where}: parameter {self.name!r} is NaN")
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            rng = f"({self.low}, {self.high}]" if self.low_open else f"[{self.low}, {self.high}]"
            raise ConfigError(f"{where}: parameter {self.name!r}={value} is outside {rng}")
        if self.high is not None and value > self.high:
            rng = f"({self.low}, {self.high}]" if self.low_open else f"[{self.low}, {self.high}]"
            raise ConfigError(f"{where}: parameter {self.name!r}={value} is outside {rng}")
        return value


class MergeInput:
    """What a method sees for one tensor. Deltas are computed at most once (or given resident)."""

    def __init__(
        self,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor] | None,
        model_params: Sequence[dict[str, Any]],
        global_params: dict[str, Any],
        *,
        deltas: Sequence[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        name: str = "",
    ) -> None:
        if tensors is None and (deltas is None or base is None):
            raise ValueError("MergeInput needs the source tensors, or a base and the deltas")
        self.base = base
        self._tensors = list(tensors) if tensors is not None else None
        self.model_params = list(model_params)
        self.global_params = dict(global_params)
        self._deltas = list(deltas) if deltas is not None else None
        self.generator = generator
        self.name = name

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Source tensors (derived as base + delta when a worker keeps only deltas resident)."""
        if self._tensors is None:
            assert self._deltas is not None and self.base is not None
            self._tensors = [self.base + d for d in self._deltas]
        return self._tensors

    @property
    def deltas(self) -> list[torch.Tensor]:
        """Task vectors: source minus base (requires a base)."""
        if self.base is None:
            raise ConfigError(f"tensor {self.name!r}: this method needs a base_model")
        if self._deltas is None:
            self._deltas = [t - self.base for t in self.tensors]
        return self._deltas

    def per_model(self, param: str) -> list[Any]:
        return [p[param] for p in self.model_params]


Coefficients = tuple[float, list[float]]  # (c_base, [c_i]) of a weighted-sum method


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its parameters and the function that merges one tensor."""

    name: str
    merge: Callable[[MergeInput], torch.Tensor]
    params: tuple[Param, ...] = ()
    needs_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    randomized: bool = False
    # mergekit drops a source equal to base_model from delta-based methods; this flag says so.
    skips_base_model: bool = False
    # The method is a fixed weighted sum of the sources, out = c_base * base + sum_i c_i x_i:
    # given (model_params, global_params) this returns (c_base, [c_i]) and the engine runs its
    # fused weighted-sum kernel instead of `merge` (same numbers up to float32 rounding).
    coefficients: Callable[[Sequence[dict[str, Any]], dict[str, Any]], Coefficients] | None = field(
        default=None, compare=False
    )
    # Each output element depends only on the same element of the inputs (weighted sums too):
    # merged tensor by tensor, never over a stack of fused tensors (evomerge.fusion).
    elementwise: bool = False
    doc: str = field(default="", compare=False)
    # Rules that tie parameters together (della: density +/- epsilon inside (0, 1)); called with
    # (model_params, global_params, where) after defaults are filled; raises ConfigError.
    check: Callable[[Sequence[dict[str, Any]], dict[str, Any], str], None] | None = field(
        default=None, compare=False
    )

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    def param(self, name: str, where: str = "") -> Param:
        for p in self.params:
            if p.name == name:
                return p
        names = ", ".join(p.name for p in self.params) or "none"
        raise ConfigError(
            f"{where}: method {self.name!r} has no parameter {name!r} (it takes: {names})"
        )

    def fill_model_params(self, given: dict[str, Any], where: str) -> dict[str, Any]:
        """Defaults filled, unknown names and out-of-range values rejected."""
        out = {}
        for key in given:
            p = self.param(key, where)
            if not p.per_model:
                raise ConfigError(
                    f"{where}: {key!r} is a global parameter of {self.name!r}, not a per-model one"
                )
        for p in self.model_params:
            if p.name in given:
                out[p.name] = p.check(given[p.name], where)
            elif p.default is None:
                raise ConfigError(
                    f"{where}: method {self.name!r} needs per-model parameter {p.name!r}"
                )
            else:
                out[p.name] = p.default
        return out

    def fill_global_params(self, given: dict[str, Any], where: str) -> dict[str, Any]:
        out = {}
        for key in given:
            p = self.param(key, where)
            if p.per_model:
                raise ConfigError(
                    f"{where}: {key!r} is a per-model parameter of {self.name!r}, not a global one"
                )
        for p in self.global_params:
            if p.name in given:
                out[p.name] = p.check(given[p.name], where)
            elif p.default is None:
                raise ConfigError(f"{where}: method {self.name!r} needs parameter {p.name!r}")
            else:
                out[p.name] = p.default
        return out

    def check_params(
        self, model_params: Sequence[dict[str, Any]], global_params: dict[str, Any], where: str
    ) -> None:
        """Cross-parameter rules, after `fill_*_params`; a no-op for most methods."""
        if self.check is not None:
            self.check(model_params, global_params, where)

    def check_model_count(self, n: int, where: str) -> None:
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            want = (
                f"exactly {self.min_models}"
                if self.max_models == self.min_models
                else f"at least {self.min_models}"
                + (f" and at most {self.max_models}" if self.max_models else "")
            )
            raise ConfigError(f"{where}: method {self.name!r} takes {want} models, got {n}")


#: Built-in entries are lazy (evomerge/methods/__init__.py); plugins register here or through
#: the `evomerge.methods` entry-point group.
METHODS: Registry[MergeMethod] = Registry(
    "merge method", MergeMethod, entry_points="evomerge.methods"
)


def register_method(method: MergeMethod) -> MergeMethod:
    """Register a plugin's method under its own name."""
    METHODS.register(method.name, method)
    return method

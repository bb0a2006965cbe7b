"""How mergekit reads the values in a config: the keys its models drop, parameter settings
(scalars coerced with pydantic's lax rules, gradients, {filter, value} lists), model references,
and the scope by scope lookup of a parameter (model, slice, top level).

Kept apart from `mergekit_read` (the config's shape) so that each stays one job; both mirror
mergekit 0.1.5 (mergekit/config.py, parameter_resolver.py, common.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from evomerge.errors import ConfigError
from evomerge.hub_ref import with_revision
from evomerge.methods.base import MergeMethod, Param
from evomerge.registry import did_you_mean

LOG = logging.getLogger("evomerge.mergekit")


def warn(message: str) -> None:
    """One warning line on stderr (through logging, so library users can filter it)."""
    LOG.warning("evomerge: warning: %s", message)


class ParamReader:
    """Reads one config's parameters for its method, collecting what mergekit ignores."""

    def __init__(self, where: str, method_name: str, method: MergeMethod) -> None:
        self.where = where
        self.method_name = method_name
        self.method = method
        self.params = {p.name: p for p in method.params}
        # parameter -> where it was written, for one warning line per ignored parameter
        self.unused: dict[str, list[str]] = {}
        self.misplaced: dict[str, list[str]] = {}

    def fail(self, at: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {at}: {message}" if at else f"{self.where}: {message}")

    def keys(self, data: Mapping[str, Any], known: tuple[str, ...], at: str) -> None:
        """Warn about each key mergekit's model would drop, with a 'did you mean'."""
        for key in data:
            if key in known:
                continue
            hint = did_you_mean(str(key), known)
            if not hint and at == "" and key in self.params:
                hint = f"; did you mean parameters.{key}?"
            place = f"{at}: " if at else ""
            warn(f"{self.where}: {place}{key!r} is not a mergekit key; mergekit ignores it{hint}")

    def model_ref(self, value: Any, at: str) -> str:
        return model_ref(value, f"{self.where}: {at}")

    def parameters(self, data: Any, at: str, *, per_model_level: bool) -> dict[str, Any]:
        """A `parameters:` mapping with mergekit's treatment: unused names dropped with a
        warning, scalars coerced to each parameter's type, values checked where written."""
        if data is None:
            return {}
        if not isinstance(data, Mapping):
            raise self.fail(at, f"parameters must be a mapping, got {data!r}")
        out: dict[str, Any] = {}
        for key, value in data.items():
            p = self.params.get(key)
            if p is None:
                self.unused.setdefault(key, []).append(at)
                continue
            if per_model_level and not p.per_model:
                self.misplaced.setdefault(key, []).append(at)
                continue
            out[key] = self.setting(value, p, at)
        return out

    def flush(self) -> None:
        """The ignored parameters, one warning line each, naming where they were written."""
        takes = ", ".join(self.params) or "none"
        for key, places in self.unused.items():
            warn(
                f"{self.where}: parameter {key!r} is not used by {self.method_name} (it takes: "
                f"{takes}); ignored, as mergekit does (in {', '.join(places)})"
            )
        for key, places in self.misplaced.items():
            warn(
                f"{self.where}: {key!r} is a global parameter of {self.method_name}; mergekit "
                f"reads it only from the top-level or slice parameters and ignores it in "
                f"{', '.join(places)}"
            )

    def require(
        self,
        at: str,
        params: Mapping[str, Any],
        fallback: Mapping[str, Any],
        *,
        is_base: bool,
        appended: bool = False,
    ) -> None:
        """A per-model parameter without a default must be given for each input, at the model or
        (as mergekit's fallback) the slice or top-level parameters."""
        if is_base and self.method.skips_base_model:
            return
        for p in self.method.model_params:
            if p.default is None and p.name not in params and p.name not in fallback:
                why = (
                    f"mergekit merges base_model as one more input of {self.method_name} "
                    f"and needs its {p.name!r}: list it under models: with a {p.name}, set "
                    f"parameters.{p.name}, or drop base_model"
                    if appended
                    else f"{self.method_name} needs parameter {p.name!r} for this model"
                )
                typos = [k for k, where in self.unused.items() if at in where]
                close = did_you_mean(p.name, typos).removeprefix("; did you mean ")
                hint = (
                    f" ({close.rstrip('?')} is no parameter of {self.method_name})" if close else ""
                )
                raise self.fail(
                    at, f"{why}{hint} (mergekit: 'Missing required parameter {p.name}')"
                )

    def setting(self, value: Any, p: Param, at: str) -> Any:
        """A scalar, a gradient list, or {filter, value} conditionals, leaves coerced."""
        if isinstance(value, Mapping):
            return [self.conditional(value, p, at)]
        if isinstance(value, list):
            if value and all(isinstance(e, Mapping) for e in value):
                return [self.conditional(e, p, at) for e in value]
            if any(isinstance(e, (Mapping, list)) for e in value):
                raise self.fail(
                    at, f"parameter {p.name!r}: a list mixes values and {{filter, value}} entries"
                )
            leaves = [self.scalar(e, p, at) for e in value]
            if any(isinstance(e, bool) for e in leaves):
                raise self.fail(
                    at,
                    f"parameter {p.name!r}: a list of true/false values (one per layer) is not supported",
                )
            return leaves
        return self.scalar(value, p, at)

    def conditional(self, entry: Mapping[str, Any], p: Param, at: str) -> dict[str, Any]:
        self.keys(entry, ("filter", "value"), f"{at}: parameter {p.name!r} entry")
        if "value" not in entry:
            raise self.fail(
                at,
                f"parameter {p.name!r}: a {{filter, value}} entry needs a value, got {dict(entry)}",
            )
        inner = entry["value"]
        if isinstance(inner, Mapping) or (
            isinstance(inner, list) and any(isinstance(e, (Mapping, list)) for e in inner)
        ):
            raise self.fail(
                at, f"parameter {p.name!r}: a filter entry's value is a number or a gradient list"
            )
        f = entry.get("filter")
        return {"filter": None if f is None else str(f), "value": self.setting(inner, p, at)}

    def scalar(self, value: Any, p: Param, at: str) -> Any:
        """mergekit validates with pydantic's lax rules: '1e-5' -> 1e-05, 'yes' -> True."""
        if value is None:
            raise self.fail(at, f"parameter {p.name!r} has no value")
        try:
            coerced = TypeAdapter(p.kind).validate_python(value)
        except ValidationError:
            kind = {bool: "true or false", int: "an integer"}.get(p.kind, "a number")
            raise self.fail(at, f"parameter {p.name!r}: {value!r} is not {kind}") from None
        return p.check(coerced, f"{self.where}: {at}")


def _model_path(value: Any, where: str) -> Any:
    """A ModelPath: a string, or {path, revision}, as one reference ('org/name@revision')."""
    if isinstance(value, Mapping):
        path, revision = value.get("path"), value.get("revision")
        if revision is not None and (not isinstance(revision, str) or not revision.strip()):
            raise ConfigError(
                f"{where}: revision must be a branch, tag or commit, got {revision!r}"
            )
        if revision and isinstance(path, str) and "@" in path:
            raise ConfigError(
                f"{where}: {path!r} already pins a revision; give it once (path@revision or "
                "revision:)"
            )
        return with_revision(path, revision) if isinstance(path, str) and path else path
    return value


def model_ref(value: Any, where: str) -> str:
    """A ModelReference as mergekit parses it ('path', 'path+lora', 'path@rev', a mapping
    {model, lora} of paths or {path, revision}): the path, 'org/name@revision' for a pinned
    hub revision (resolved by `checkpoint.resolve_model_path`), or 'base+adapter' for a LoRA
    (`evomerge.lora`)."""
    if isinstance(value, Mapping) and "path" in value and "model" not in value:
        value = _model_path(value, where)
    if isinstance(value, Mapping):
        inner = value.get("model")
        if value.get("override_architecture"):
            warn(f"{where}: override_architecture is ignored (the tensors decide)")
        inner = _model_path(inner, where)
        lora = _model_path(value.get("lora"), where)
        if lora:
            if not isinstance(inner, str) or not inner or not isinstance(lora, str):
                raise ConfigError(f"{where}: expected a model path and a LoRA path, got {value!r}")
            inner = f"{inner}+{lora}"
        value = inner
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a model path, got {value!r}")
    if value.count("+") > 1:
        raise ConfigError(f"{where}: {value!r} is not BASE+ADAPTER (mergekit's LoRA syntax)")
    for part in value.split("+"):
        if part.count("@") > 1 and not Path(part).expanduser().exists():
            raise ConfigError(
                f"{where}: {part!r} has more than one '@' (mergekit's syntax is org/name@revision)"
            )
    return value


def fallback(primary: Any, secondary: Any) -> Any:
    """mergekit looks a parameter up scope by scope and takes the first that gives a value for
    the tensor; a filter list without a catch-all falls through to the next scope. As one value:
    the primary's entries, then the secondary as the catch-all."""
    conditionals = isinstance(primary, list) and all(isinstance(e, Mapping) for e in primary)
    if conditionals and primary and all(e.get("filter") not in (None, "*") for e in primary):
        return [*primary, {"filter": None, "value": secondary}]
    return primary


def merged(slice_params: Mapping[str, Any], global_params: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(global_params)
    for key, value in slice_params.items():
        out[key] = fallback(value, global_params[key]) if key in global_params else value
    return out

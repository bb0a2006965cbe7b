"""The options model every plugin (optimizer, executor) declares, validated when a config loads.

A plugin's `Options` subclasses `PluginOptions`: typed fields for what evomerge knows, plus,
where the plugin forwards options to a library (pycma's options, an Optuna sampler's
constructor), `extra_names()` listing what that library accepts. Unknown names are refused with
"did you mean"; names evomerge sets itself (`reserved`) say why they are not settable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from typing_extensions import Self

from evomerge.errors import ConfigError
from evomerge.registry import did_you_mean


class PluginOptions(BaseModel):
    """Frozen options of one plugin; `parse` turns a validation error into one ConfigError line."""

    # "allow" keeps the extras a library accepts; the name check below refuses everything else
    model_config = ConfigDict(frozen=True, extra="allow")
    #: option name -> why the user cannot set it
    reserved: ClassVar[dict[str, str]] = {}
    #: how error messages name the extras when they are too many to list ("any pycma option")
    extras_label: ClassVar[str] = ""

    @classmethod
    def extra_names(cls) -> Iterable[str] | None:
        """Names accepted beyond the declared fields (forwarded to a library); None: none."""
        return None

    @model_validator(mode="before")
    @classmethod
    def _known_names(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        extra = cls.extra_names()
        known = (set(cls.model_fields) | set(extra or ())) - set(cls.reserved)
        for key in data:
            if key in cls.reserved:
                raise ValueError(f"option {key!r} is not settable: {cls.reserved[key]}")
            if key not in known:
                listed = sorted(cls.model_fields) if cls.extras_label else sorted(known)
                available = ", ".join([*listed, cls.extras_label] if cls.extras_label else listed)
                raise ValueError(
                    f"unknown option {key!r}{did_you_mean(key, known)} "
                    f"(available: {available or 'none'})"
                )
        return data

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None, where: str) -> Self:
        """Validate `data`; options set to None mean "the default" and are dropped."""
        from evomerge.yaml_io import format_validation_error

        given = {k: v for k, v in (data or {}).items() if v is not None}
        try:
            return cls.model_validate(given)
        except ValidationError as exc:
            raise ConfigError(f"{where}: {format_validation_error(exc)}") from None

    def given(self) -> dict[str, Any]:
        """The options the user set (defaults left out), extras included, as plain data."""
        return self.model_dump(exclude_unset=True)

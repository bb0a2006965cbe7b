"""Reading YAML files and validating them into pydantic models, with one-line user errors.

Every config we read (study, search space, recipe) fails the same way: a missing file is a
MissingPathError, a syntax error names its line and column, and a validation error names the
first offending field. Kept apart from the models so that they stay leaves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from evomerge.errors import ConfigError, MissingPathError

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: str | Path) -> Any:
    """The parsed file; MissingPathError or ConfigError (with line and column) otherwise."""
    p = Path(path)
    if not p.exists():
        raise MissingPathError(f"{p}: file does not exist")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{p}: YAML syntax error{at}: {problem}") from None


def format_validation_error(exc: ValidationError) -> str:
    """First pydantic error as 'field.path: message' on one line."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    extra = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{loc}: {msg}{extra}" if loc else f"{msg}{extra}"


def validate_model(model: type[M], data: Any, where: str) -> M:
    """`model.model_validate(data)`, a ValidationError becoming 'where: field: message'."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {format_validation_error(exc)}") from None

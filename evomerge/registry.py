"""One registry type for everything users extend: merge methods, optimizers, executors.

Duplicates raise, unknown names get "did you mean", registrations are type-checked.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from evomerge.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object map with one way to register."""

    def __init__(self, kind: str, base: type | None = None) -> None:
        self.kind = kind
        self._base = base
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if self._base is not None and not isinstance(item, self._base):
            raise TypeError(
                f"{self.kind} {name!r} must be a {self._base.__name__}, got {type(item).__name__}"
            )
        self._items[name] = item
        return item

    def decorator(self, name: str) -> Callable[[T], T]:
        def wrap(item: T) -> T:
            return self.register(name, item)

        return wrap

    def get(self, name: str, where: str = "") -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(self.unknown_message(name, where)) from None

    def unknown_message(self, name: str, where: str = "") -> str:
        close = difflib.get_close_matches(str(name), list(self._items), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        place = f" in {where}" if where else ""
        return f"unknown {self.kind} {name!r}{place}{hint} (available: {', '.join(sorted(self._items))})"

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)

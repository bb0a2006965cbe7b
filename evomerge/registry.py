"""One registry type for everything users extend: merge methods, optimizers, executors, presets.

An entry is the object itself or a lazy `"module:attr"` string (as lm-eval's registry does),
imported on first `get`: listing names, validating a name or printing `--help` imports nothing
heavy. Third-party packages add entries without touching evomerge through a Python entry-point
group (`[project.entry-points."evomerge.optimizers"] my_opt = "my_pkg.opt:MyOptimizer"`), read
once, lazily, the first time a registry is asked for names. Duplicates raise, resolved entries are
type-checked, unknown names get "did you mean".
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Generic, TypeVar

from evomerge.errors import ConfigError

T = TypeVar("T")


def did_you_mean(name: str, known: Iterable[str], n: int = 1) -> str:
    """'; did you mean 'x'?' for the closest known names, or '' when none is close."""
    close = list(dict.fromkeys(difflib.get_close_matches(str(name), list(known), n=n)))
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _is_lazy(item: object) -> bool:
    return isinstance(item, str) and ":" in item and not item.startswith(":")


class Registry(Generic[T]):
    """Name -> object map with one way to register (`register`, or its `decorator` form)."""

    def __init__(
        self,
        kind: str,
        base: type | None = None,
        *,
        classes: bool = False,
        entry_points: str | None = None,
        discover: Callable[[], Mapping[str, T | str]] | None = None,
    ) -> None:
        self.kind = kind
        self._base = base
        self._classes = classes  # entries are subclasses of `base`, not instances
        self._items: dict[str, T | str] = {}
        self._entry_points = entry_points
        self._discover = discover
        self._discovered = entry_points is None and discover is None

    def register(self, name: str, item: T | str) -> T | str:
        """Add `item` (or a lazy "module:attr" reference to it) under `name`."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.kind} names are non-empty strings, got {name!r}")
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if not _is_lazy(item):
            self._check_type(name, item)
        self._items[name] = item
        return item

    def decorator(self, name: str) -> Callable[[T], T]:
        def wrap(item: T) -> T:
            self.register(name, item)
            return item

        return wrap

    def get(self, name: str, where: str = "") -> T:
        """The entry, imported if it was lazy; an unknown name is a ConfigError naming `where`."""
        self._load_discovered()
        if name not in self._items:
            raise ConfigError(self.unknown_message(name, where))
        item = self._items[name]
        if _is_lazy(item):
            item = self._resolve(name, item)  # type: ignore[arg-type]
            self._items[name] = item
        return item  # type: ignore[return-value]

    def unknown_message(self, name: str, where: str = "") -> str:
        self._load_discovered()
        place = f" in {where}" if where else ""
        return (
            f"unknown {self.kind} {name!r}{place}{did_you_mean(name, self._items)} "
            f"(available: {', '.join(sorted(self._items))})"
        )

    def names(self) -> list[str]:
        self._load_discovered()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load_discovered()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _resolve(self, name: str, ref: str) -> T:
        module_name, _, attr = ref.partition(":")
        try:
            obj: object = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"{self.kind} {name!r}: cannot load {ref!r} ({exc})") from exc
        self._check_type(name, obj)
        return obj  # type: ignore[return-value]

    def _check_type(self, name: str, item: object) -> None:
        if self._base is None:
            return
        if self._classes:
            ok = isinstance(item, type) and issubclass(item, self._base)
        else:
            ok = isinstance(item, self._base)
        if not ok:
            what = "subclass" if self._classes else "instance"
            raise TypeError(
                f"{self.kind} {name!r} must be a {self._base.__name__} {what}, got {item!r}"
            )

    def _load_discovered(self) -> None:
        if self._discovered:
            return
        self._discovered = True  # first, so a failing plugin is not retried on every call
        found: dict[str, T | str] = dict(self._discover() if self._discover else {})
        if self._entry_points:
            from importlib.metadata import entry_points

            found.update({ep.name: ep.value for ep in entry_points(group=self._entry_points)})
        for name, item in found.items():
            if name in self._items:
                raise ValueError(
                    f"{self.kind} {name!r} is registered twice (built in, and by {item!r})"
                )
            self.register(name, item)

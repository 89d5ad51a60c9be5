"""A tiny named registry: pluggable parts (stage kinds, rewards, estimators, engines) are looked up by name.

Why: configs name parts as strings; a registry turns an unknown name into an error that lists the known ones,
instead of an if/elif chain that grows with every addition.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and not replace:
                raise KeyError(f"{self.what} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise KeyError(f"unknown {self.what} {name!r}; known: {known}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)


def resolve(path: str) -> Any:
    """The object at `module:attr` (a dotted attribute path after the colon), imported now."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"{path!r} is not of the form module:attr")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class LazyRegistry(Registry[T]):
    """A registry whose built-in entries are `module:attr` strings, imported at the first `get` of their name:
    a part with heavy libraries (vLLM, a judge's HTTP client) costs nothing until a config asks for it. Plugins
    may still `register` objects directly."""

    def __init__(self, what: str, builtin: dict[str, str] | None = None) -> None:
        super().__init__(what)
        self._lazy: dict[str, str] = dict(builtin or {})

    def get(self, name: str) -> T:
        if name not in self._items and name in self._lazy:
            self._items[name] = resolve(self._lazy[name])
        return super().get(name)

    def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        if name in self._lazy and not replace:
            raise KeyError(f"{self.what} {name!r} is already registered")
        if replace:
            self._lazy.pop(name, None)
        return super().register(name, replace=replace)

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        return sorted({*self._items, *self._lazy})

"""A small decorator registry, so that a new synthesizer or quantizer is one file."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from dfq_deploy.errors import DfqError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object mapping filled by a decorator.

    Example:
        >>> SOURCES = Registry("synthesizer")
        >>> @SOURCES.register("noise")
        ... class Noise: ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise DfqError(f"unknown {self.kind} '{name}': choose one of {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

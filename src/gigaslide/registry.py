"""A small namespaced registry, shared by encoders, MIL models, slide encoders, SSL methods.

Names are lower-case strings; entries are any objects (usually factories or spec dataclasses).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from gigaslide.errors import GigaslideError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, namespace: str):
        self.namespace = namespace
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        key = name.lower()
        if key in self._entries:
            raise ValueError(f"{self.namespace}/{key} is already registered")
        self._entries[key] = entry
        return entry

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            return self.add(name, obj)

        return deco

    def get(self, name: str) -> T:
        key = name.lower().removeprefix(self.namespace + "/")
        try:
            return self._entries[key]
        except KeyError:
            raise GigaslideError(
                f"unknown {self.namespace} '{name}'",
                fix=f"use one of: {', '.join(sorted(self._entries))}",
            ) from None

    def __contains__(self, name: str) -> bool:
        return name.lower().removeprefix(self.namespace + "/") in self._entries

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._entries.items()))

    def __len__(self) -> int:
        return len(self._entries)

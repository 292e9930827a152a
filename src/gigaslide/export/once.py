"""A thread-safe memo: each value is made once, by one thread, while other keys go on being served."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

from gigaslide.errors import GigaslideError


class Once:
    """``get(key, make)`` returns ``make()``'s value, computed once per key (a GigaslideError is kept too)."""

    def __init__(self) -> None:
        self._values: dict[Hashable, Any] = {}
        self._locks: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._values:
                v = self._values[key]
                if isinstance(v, GigaslideError):
                    raise v
                return v
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # only callers of this key wait for it
            with self._lock:
                done = key in self._values
            if not done:
                try:
                    v = make()
                except GigaslideError as e:
                    v = e
                with self._lock:
                    self._values[key] = v
        v = self._values[key]
        if isinstance(v, GigaslideError):
            raise v
        return v

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._values[key] = value

    def forget(self, keep: Callable[[Hashable], bool]) -> int:
        """Drop the values whose key ``keep`` rejects (a job done with them: memory stays bounded); returns how many."""
        with self._lock:
            gone = [k for k in self._values if not keep(k)]
            for k in gone:
                del self._values[k]
                self._locks.pop(k, None)
        return len(gone)

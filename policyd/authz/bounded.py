"""Bounded in-process memories, for what clients can make us learn.

Anything a client can add to (refused secrets, unknown prefixes, its failures) must not
grow without bound: past `limit` entries the oldest is dropped, whether it expired or not.
"""

from __future__ import annotations

import time
from typing import Generic, TypeVar

__all__ = ["ExpiringSet", "WindowCounts"]

_K = TypeVar("_K")
_V = TypeVar("_V")


def _newest(memory: dict[_K, _V], key: _K, value: _V, limit: int) -> None:
    """Put `key` at the newest end of `memory`; drop the oldest entry past `limit`."""
    memory.pop(key, None)
    memory[key] = value
    if len(memory) > limit:
        del memory[next(iter(memory))]


class ExpiringSet(Generic[_K]):
    """Keys remembered until a monotonic deadline, at most `limit` of them."""

    def __init__(self, *, limit: int) -> None:
        self._limit = limit
        self._until: dict[_K, float] = {}

    def add(self, key: _K, *, for_s: float) -> None:
        """Remember `key` for `for_s` seconds (re-adding moves it to the newest end)."""
        _newest(self._until, key, time.monotonic() + for_s, self._limit)

    def left_s(self, key: _K) -> float:
        """Seconds `key` is still remembered for; 0 when it is not (or no longer)."""
        until = self._until.get(key)
        if until is None:
            return 0.0
        left = until - time.monotonic()
        if left <= 0:
            del self._until[key]
            return 0.0
        return left

    def __len__(self) -> int:
        return len(self._until)


class WindowCounts(Generic[_K]):
    """Events per key in a fixed window that starts with the key's first event, for at
    most `limit` keys."""

    def __init__(self, *, window_s: float, limit: int) -> None:
        self._window_s = window_s
        self._limit = limit
        #: key -> (start of its window, events in it)
        self._counts: dict[_K, tuple[float, int]] = {}

    def add(self, key: _K) -> int:
        """Count one event for `key`; its events in the current window, this one included."""
        now = time.monotonic()
        start, count = self._counts.get(key, (now, 0))
        if now - start >= self._window_s:
            start, count = now, 0
        _newest(self._counts, key, (start, count + 1), self._limit)
        return count + 1

    def __len__(self) -> int:
        return len(self._counts)

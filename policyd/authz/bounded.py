"""A bounded in-process memory of keys with an expiry, for what clients can make us learn.

Anything a client can add to (refused secrets, unknown prefixes) must not grow without
bound: past `limit` entries the oldest is dropped, whether it expired or not.
"""

from __future__ import annotations

import time
from typing import Generic, TypeVar

__all__ = ["ExpiringSet"]

_K = TypeVar("_K")


class ExpiringSet(Generic[_K]):
    """Keys remembered until a monotonic deadline, at most `limit` of them."""

    def __init__(self, *, limit: int) -> None:
        self._limit = limit
        self._until: dict[_K, float] = {}

    def add(self, key: _K, *, for_s: float) -> None:
        """Remember `key` for `for_s` seconds (re-adding moves it to the newest end)."""
        self._until.pop(key, None)
        self._until[key] = time.monotonic() + for_s
        if len(self._until) > self._limit:
            del self._until[next(iter(self._until))]

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

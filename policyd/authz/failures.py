"""Failed key verifications, remembered in Redis so a flood of wrong secrets stays cheap.

Two facts per key prefix, shared by every policyd replica:
- each failed (prefix, secret) for `memory_s`, by the key's keyed digest (useless without
  the server secret), so the same wrong secret never reaches Argon2id twice;
- how many secrets were checked for the prefix in the current window (counted before the
  check, so concurrent requests cannot all slip under the budget); past `budget` the
  prefix's unverified secrets are refused without Argon2id until the window ends.

Unknown prefixes are counted exactly like known ones, so neither the status nor the
timing of a refusal tells whether a prefix exists.

Each process also keeps what it learnt for a few seconds (bounded), so a client that
repeats a refused secret, or keeps knocking on a spent prefix, costs no Redis round trip.
"""

from __future__ import annotations

import asyncio
import math
from typing import Final, cast

import attrs
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from policyd.authz.bounded import ExpiringSet
from policyd.shared.errors import redis_failure
from policyd.shared.keyspace import auth_failure, auth_failures

__all__ = ["FailureMemory", "FailureState"]

#: How long a process trusts what it learnt itself (Redis stays the shared truth).
_LOCAL_S: Final = 5.0
#: Bound on each in-process memory: a spray of distinct secrets cannot grow it further.
_LOCAL_ENTRIES: Final = 10_000


@attrs.frozen
class FailureState:
    """What Redis remembers about a prefix and one of its secrets."""

    #: This exact secret already failed for this prefix.
    remembered: bool
    #: Secrets checked for this prefix in the current window.
    failures: int
    #: Seconds until the window ends (0 when nothing is counted).
    window_left_s: int


class FailureMemory:
    """Reads and records failed verifications: Redis, behind a short in-process memory."""

    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        memory_s: int,
        window_s: int,
        budget: int,
        timeout_s: float,
        gate: asyncio.Semaphore,
    ) -> None:
        self._redis = redis
        # Calls through redis-py's pool at once (see KeyStore): a burst waits, never fails.
        self._gate = gate
        self._memory_s = memory_s
        self._window_s = window_s
        self._budget = budget
        self._timeout_s = timeout_s
        # Refused (prefix, digest) pairs, and prefixes whose budget is spent.
        self._refused: ExpiringSet[tuple[str, str]] = ExpiringSet(limit=_LOCAL_ENTRIES)
        self._spent: ExpiringSet[str] = ExpiringSet(limit=_LOCAL_ENTRIES)

    async def look(self, prefix: str, digest: str) -> FailureState:
        """Whether this secret already failed, and the prefix's checks in the window."""
        if self._refused.left_s((prefix, digest)):
            return FailureState(remembered=True, failures=0, window_left_s=0)
        spent_s = self._spent.left_s(prefix)
        if spent_s:
            return FailureState(
                remembered=False, failures=self._budget, window_left_s=max(1, math.ceil(spent_s))
            )
        counter = auth_failures(prefix)
        try:
            async with (
                asyncio.timeout(self._timeout_s),
                self._gate,
                self._redis.pipeline(transaction=False) as pipe,
            ):
                pipe.exists(auth_failure(prefix, digest))
                pipe.get(counter)
                pipe.ttl(counter)
                exists, count, ttl = cast(
                    tuple[int, bytes | None, int], tuple(await pipe.execute())
                )
        except (RedisError, OSError, TimeoutError) as exc:
            raise redis_failure(exc) from exc
        state = FailureState(
            remembered=bool(exists),
            failures=int(count) if count is not None else 0,
            window_left_s=max(ttl, 0),
        )
        if state.remembered:
            self._refused.add((prefix, digest), for_s=_LOCAL_S)
        elif state.failures >= self._budget and state.window_left_s > 0:
            self._spent.add(prefix, for_s=min(_LOCAL_S, state.window_left_s))
        return state

    async def admit(self, prefix: str) -> int:
        """Count one verification against the prefix's window; returns the new count."""
        counter = auth_failures(prefix)
        try:
            async with (
                asyncio.timeout(self._timeout_s),
                self._gate,
                self._redis.pipeline(transaction=False) as pipe,
            ):
                pipe.incr(counter)
                # The window starts with its first check and is not extended by later ones.
                pipe.expire(counter, self._window_s, nx=True)
                count, _ = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            raise redis_failure(exc) from exc
        return int(count)

    async def remember(self, prefix: str, digest: str) -> None:
        """Remember a failed secret, so it is refused without Argon2id from now on."""
        try:
            async with asyncio.timeout(self._timeout_s), self._gate:
                await self._redis.set(auth_failure(prefix, digest), b"1", ex=self._memory_s)
        except (RedisError, OSError, TimeoutError) as exc:
            raise redis_failure(exc) from exc
        self._refused.add((prefix, digest), for_s=_LOCAL_S)

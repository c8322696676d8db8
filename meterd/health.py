"""meterd's heartbeat: a Redis key with a TTL, carrying the daemon's lag and counters.

The daemon rewrites it every third of its TTL while its loop runs, so the key vanishes
when the process dies or hangs. `meterd --check` reads it: exit 0 while it is fresh,
1 when it is missing or stale (or Redis cannot be asked), printing the figures as JSON.
"""

from __future__ import annotations

import sys
import time
from typing import Final

import attrs
import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from meterd.settings import Settings
from policyd.shared import keyspace
from policyd.shared.sentinel import redis_client

__all__ = ["Beat", "publish", "read_beat", "run_check"]

_EXIT_OK: Final = 0
_EXIT_STALE: Final = 1


@attrs.frozen(kw_only=True)
class Beat:
    """What the heartbeat says; `at` is epoch seconds of the beat."""

    node: str
    at: float
    #: "ok", "retrying" (Postgres or Redis unavailable), or "draining" (after SIGTERM).
    state: str
    #: Bytes in the log (all files) not yet settled.
    lag_bytes: int
    #: Seconds between now and the start of the last settled request, while behind.
    lag_seconds: float
    lines: int
    bad_lines: int
    settled: int
    #: Reservations charged as reserved because their log line never arrived (sweep.py).
    swept: int = 0


_ENCODE: Final = msgspec.json.Encoder()


async def publish(redis: aioredis.Redis, beat: Beat, *, ttl_s: int) -> None:
    """Write the beat with its expiry in one command."""
    await redis.set(keyspace.heartbeat(beat.node), _ENCODE.encode(attrs.asdict(beat)), ex=ttl_s)


async def read_beat(redis: aioredis.Redis, node: str) -> Beat | None:
    raw = await redis.get(keyspace.heartbeat(node))
    if raw is None:
        return None
    try:
        return Beat(**msgspec.json.decode(raw))
    except (msgspec.DecodeError, TypeError):
        return None


async def run_check(settings: Settings) -> int:
    """`meterd --check`: 0 when this node's heartbeat is fresh, else 1."""
    client = redis_client(
        settings.redis_url, settings.sentinels, socket_timeout=5, socket_connect_timeout=5
    )
    try:
        beat = await read_beat(client, settings.node)
    except (RedisError, OSError) as exc:
        print(f"meterd: cannot read the heartbeat ({type(exc).__name__})", file=sys.stderr)
        return _EXIT_STALE
    finally:
        await client.aclose()
    if beat is None:
        print(f"meterd: no heartbeat from node {settings.node!r}", file=sys.stderr)
        return _EXIT_STALE
    age = time.time() - beat.at
    print(msgspec.json.encode({**attrs.asdict(beat), "age_s": round(age, 3)}).decode())
    return _EXIT_OK if age <= settings.heartbeat_ttl_s else _EXIT_STALE

"""Redis behind Sentinel: find the current primary, and only ever talk to a primary.

With `NZ_REDIS_SENTINELS` set (space-separated `host:port` of the Sentinels) the host and
port of `NZ_REDIS_URL` are ignored: the primary is whatever the Sentinels name for
`NZ_REDIS_SENTINEL_SERVICE` (default `nz`); the URL still gives the password and the
database. Every new connection asks again, and checks with ROLE that it reached a
primary, so after a failover the daemons follow the new primary on their next
connection. Until one is found, calls fail as outages (policyd refuses with 503).

Dependency-free like `contract` apart from redis-py (meterd imports it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Final

import attrs
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError

from policyd.shared.envreader import EnvReader
from policyd.shared.resp import (
    IncompleteReply,
    Locate,
    RedisAddress,
    encode_command,
    parse_reply,
    redis_address,
)

__all__ = [
    "DEFAULT_SERVICE",
    "SentinelSettings",
    "locate_primary",
    "primary_locator",
    "read_sentinels",
    "redis_client",
]

DEFAULT_SERVICE: Final = "nz"
_MAX_REPLY: Final = 64 * 1024


@attrs.frozen(kw_only=True)
class SentinelSettings:
    """The Sentinels to ask and the name of the primary they watch."""

    addresses: tuple[tuple[str, int], ...]
    service: str = DEFAULT_SERVICE


def read_sentinels(read: EnvReader) -> SentinelSettings | None:
    """NZ_REDIS_SENTINELS / NZ_REDIS_SENTINEL_SERVICE, or None when no Sentinel is used."""
    raw = read.text("NZ_REDIS_SENTINELS")
    if not raw:
        return None
    addresses: list[tuple[str, int]] = []
    for number, item in enumerate(raw.replace(",", " ").split(), start=1):
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            read.errors.append(f"NZ_REDIS_SENTINELS entry {number} must be host:port")
            continue
        addresses.append((host, int(port)))
    service = read.text("NZ_REDIS_SENTINEL_SERVICE", DEFAULT_SERVICE)
    if not service.isprintable() or " " in service:
        read.errors.append("NZ_REDIS_SENTINEL_SERVICE must be one printable word")
    return SentinelSettings(addresses=tuple(addresses), service=service)


async def _ask(host: str, port: int, service: str) -> tuple[str, int] | None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(encode_command(b"SENTINEL", b"get-master-addr-by-name", service))
        await writer.drain()
        buf = b""
        while True:
            chunk = await reader.read(4096)
            if not chunk:
                raise RedisConnectionError("sentinel closed the connection")
            buf += chunk
            if len(buf) > _MAX_REPLY:
                raise RedisConnectionError("sentinel reply too large")
            try:
                value, _ = parse_reply(buf, 0, lambda message: None)
            except IncompleteReply:
                continue
            break
    finally:
        writer.close()
    if not isinstance(value, list) or len(value) != 2:
        return None  # the Sentinel does not know the service (or is not a Sentinel)
    return bytes(value[0]).decode(), int(value[1])


async def locate_primary(
    sentinels: SentinelSettings, base: RedisAddress, *, timeout_s: float
) -> RedisAddress:
    """`base` pointed at the primary the first answering Sentinel names.

    Raises ConnectionError (an outage) when no Sentinel names one in time.
    """
    problems = []
    for host, port in sentinels.addresses:
        try:
            async with asyncio.timeout(timeout_s):
                found = await _ask(host, port, sentinels.service)
        except (OSError, TimeoutError, RedisConnectionError, ValueError) as exc:
            problems.append(f"{host}:{port}: {type(exc).__name__}")
            continue
        if found is not None:
            return attrs.evolve(base, host=found[0], port=found[1], path=None)
        problems.append(f"{host}:{port}: no primary named {sentinels.service!r}")
    raise RedisConnectionError("no Sentinel named a primary (" + "; ".join(problems) + ")")


def redis_client(
    url: str,
    sentinels: SentinelSettings | None,
    *,
    wait_for_connection_s: float | None = None,
    **options: Any,
) -> aioredis.Redis:
    """A redis-py client for `url`, or for the Sentinels' primary when there are Sentinels.

    redis-py's Sentinel pool asks the Sentinels on every new connection and drops a
    connection that meets a READONLY reply, so it follows a failover by itself.

    With `wait_for_connection_s` (no Sentinels), a call that finds every connection of
    the pool (`max_connections`) busy waits up to that long for one; by default redis-py
    raises MaxConnectionsError at once, which a burst of requests turns into 503s.
    """
    if sentinels is None:
        if wait_for_connection_s is None:
            return aioredis.Redis.from_url(url, **options)
        pool = aioredis.BlockingConnectionPool.from_url(
            url, timeout=wait_for_connection_s, **options
        )
        return aioredis.Redis.from_pool(pool)
    address = redis_address(url)
    auth: Mapping[str, Any] = (
        {}
        if address is None
        else {"username": address.username, "password": address.password, "db": address.db}
    )
    names = ("socket_timeout", "socket_connect_timeout")
    timeouts = {name: options[name] for name in names if name in options}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(sentinels.addresses), sentinel_kwargs=timeouts
    )
    client: aioredis.Redis = sentinel.master_for(
        sentinels.service, redis_class=aioredis.Redis, **auth, **options
    )
    return client


def primary_locator(sentinels: SentinelSettings | None, *, timeout_s: float) -> Locate | None:
    """For a lean client: where the primary is now (None without Sentinels)."""
    if sentinels is None:
        return None
    found = sentinels

    async def locate(base: RedisAddress) -> RedisAddress:
        return await locate_primary(found, base, timeout_s=timeout_s)

    return locate

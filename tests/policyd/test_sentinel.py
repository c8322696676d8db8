"""Following the primary: Sentinel settings, ROLE checks and a primary demoted under a
connection, with real redis-server processes (a primary, a replica, one Sentinel)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError

from compose.local.services import RedisServer, SentinelServer, Service
from policyd.shared.envreader import EnvReader
from policyd.shared.errors import is_redis_outage
from policyd.shared.resp import RedisAddress, RespClient, encode_command, redis_address
from policyd.shared.sentinel import SentinelSettings, locate_primary, read_sentinels

__all__: list[str] = []


@attrs.define
class Pair:
    primary: Service[RedisServer]
    replica: Service[RedisServer]
    sentinel: Service[SentinelServer]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    base: Path = tmp_path_factory.mktemp("sentinel-pair")
    primary = Service(RedisServer(data_dir=base / "p", log_dir=base, name="primary"))
    port = primary.launcher.port
    replica = Service(
        RedisServer(data_dir=base / "r", log_dir=base, name="replica", replica_of=port)
    )
    # Never fails over on its own here (the tests move the primary by hand).
    sentinel = Service(
        SentinelServer(data_dir=base / "s", primary_port=port, down_after_ms=60_000, log_dir=base)
    )
    started: list[Service[Any]] = [primary, replica, sentinel]
    try:
        for service in started:
            service.start()
        yield Pair(primary, replica, sentinel)
    finally:
        for service in reversed(started):
            service.stop()


def test_sentinel_settings_are_read_and_checked() -> None:
    read = EnvReader({"NZ_REDIS_SENTINELS": " a:26379, [::1]:26380 b:1 ", "X": ""})
    assert read_sentinels(read) == SentinelSettings(
        addresses=(("a", 26379), ("::1", 26380), ("b", 1)), service="nz"
    )
    assert read.errors == []
    bad = EnvReader({"NZ_REDIS_SENTINELS": "a b:99999 :1", "NZ_REDIS_SENTINEL_SERVICE": "x y"})
    read_sentinels(bad)
    assert bad.errors == [
        "NZ_REDIS_SENTINELS entry 1 must be host:port",
        "NZ_REDIS_SENTINELS entry 2 must be host:port",
        "NZ_REDIS_SENTINELS entry 3 must be host:port",
        "NZ_REDIS_SENTINEL_SERVICE must be one printable word",
    ]
    assert read_sentinels(EnvReader({})) is None


def _base(url: str) -> RedisAddress:
    address = redis_address(url)
    assert address is not None
    return address


async def test_the_sentinel_names_the_primary(pair: Pair) -> None:
    """The first Sentinel that knows the service wins; one that is down is skipped."""
    dead = ("127.0.0.1", 1)
    settings = SentinelSettings(
        addresses=(dead, ("127.0.0.1", pair.sentinel.launcher.port)), service="nz"
    )
    found = await locate_primary(settings, _base("redis://:pw@elsewhere:1/3"), timeout_s=2)
    assert (found.host, found.port, found.db, found.password) == (
        "127.0.0.1",
        pair.primary.launcher.port,
        3,
        "pw",
    )
    unknown = attrs.evolve(settings, service="other")
    with pytest.raises(RedisConnectionError, match="no Sentinel named a primary"):
        await locate_primary(unknown, _base("redis://x/0"), timeout_s=2)


async def test_a_replica_is_never_used(pair: Pair) -> None:
    """Pointed at a replica, the client refuses to talk to it: an outage, not a write."""

    async def to_replica(base: RedisAddress) -> RedisAddress:
        return attrs.evolve(base, port=pair.replica.launcher.port)

    client = RespClient(url="redis://127.0.0.1:1/0", timeout_s=2, locate=to_replica)
    try:
        with pytest.raises(RedisConnectionError, match="not the primary"):
            await client.get("k")
    finally:
        await client.aclose()


def _promote(port: int, *, under: int) -> None:
    """Make the server on `port` the primary and the one on `under` its replica."""
    primary = redis.Redis(port=port)
    replica = redis.Redis(port=under)
    try:
        primary.replicaof("NO", "ONE")
        replica.replicaof("127.0.0.1", port)
    finally:
        primary.close()
        replica.close()


@pytest.fixture
async def swapped(pair: Pair) -> AsyncIterator[None]:
    """Afterwards the primary is the primary again and the replica its replica."""
    yield
    _promote(pair.primary.launcher.port, under=pair.replica.launcher.port)


async def test_a_demoted_primary_is_left_for_the_new_one(pair: Pair, swapped: None) -> None:
    """The primary becomes a replica under an open connection: the next write fails as
    an outage and the one after reaches the new primary."""
    where = {"port": pair.primary.launcher.port}

    async def locate(base: RedisAddress) -> RedisAddress:
        return attrs.evolve(base, port=where["port"])

    client = RespClient(url="redis://127.0.0.1:1/0", timeout_s=2, locate=locate)
    write = encode_command(b"SET", b"nz:test:failover", b"1")
    try:
        assert await client.call(write) == b"OK"
        _promote(pair.replica.launcher.port, under=pair.primary.launcher.port)
        where["port"] = pair.replica.launcher.port
        # READONLY, or the server dropped us on the switch: an outage either way (503).
        with pytest.raises((ReadOnlyError, RedisConnectionError)) as caught:
            await client.call(write)
        assert is_redis_outage(caught.value)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(RedisConnectionError):
                assert await client.call(write) == b"OK"
                break
            assert time.monotonic() < deadline
    finally:
        await client.aclose()

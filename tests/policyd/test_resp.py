"""The lean hot-path Redis client against a real Redis: replies, errors, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from compose.local.services import RedisServer, Service
from policyd.authz.limits import Limiter
from policyd.authz.records import KeyRecord, Limits
from policyd.shared.errors import StoreUnavailable
from policyd.shared.resp import RespClient, encode_command, redis_address, supports

__all__: list[str] = []


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[RespClient]:
    resp = RespClient(url=redis_url, timeout_s=2.0)
    yield resp
    await resp.aclose()


@pytest.fixture
async def plain(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.Redis.from_url(redis_url)
    yield redis
    await redis.aclose()


def test_encodes_commands_as_resp_arrays_of_bulk_strings() -> None:
    """Every part, whatever its type, becomes a length-prefixed bulk string."""
    assert encode_command(b"GET", "k", 12) == b"*3\r\n$3\r\nGET\r\n$1\r\nk\r\n$2\r\n12\r\n"
    assert encode_command("SET", "ü") == b"*2\r\n$3\r\nSET\r\n$2\r\n\xc3\xbc\r\n"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6390/0", True),
        ("redis://:secret@host:6379/2", True),
        ("rediss://user:pw@host", False),
        ("unix:///run/redis.sock?db=1", True),
        ("redis://host?ssl_cert_reqs=none", False),
        ("redis+sentinel://host", False),
    ],
)
def test_supports_plain_urls_and_leaves_the_rest_to_redis_py(url: str, expected: bool) -> None:
    """Plain TCP or unix URLs with credentials and db; TLS and other options mean redis-py."""
    assert supports(url) is expected


async def test_get_returns_bytes_or_none(client: RespClient, plain: aioredis.Redis) -> None:
    """GET answers the stored bytes, binary-safe, and None for a missing key."""
    await plain.set("resp:bin", b"\x00\r\n\xff")
    assert await client.get("resp:bin") == b"\x00\r\n\xff"
    assert await client.get("resp:missing") is None


async def test_concurrent_calls_get_their_own_replies(
    client: RespClient, plain: aioredis.Redis
) -> None:
    """Pipelined commands on one connection are matched to their callers in order."""
    await plain.mset({f"resp:n{i}": str(i) for i in range(200)})
    values = await asyncio.gather(*(client.get(f"resp:n{i}") for i in range(200)))
    assert values == [str(i).encode() for i in range(200)]


async def test_scripts_return_nested_arrays_and_integers(client: RespClient) -> None:
    """SCRIPT LOAD gives the SHA; EVALSHA returns integers, strings, nil and nesting."""
    sha = await client.script_load("return {1, -2, 'x', {3, false}, ARGV[1]}")
    assert await client.evalsha(sha, 0, "arg") == [1, -2, b"x", [3, None], b"arg"]


async def test_unknown_script_raises_noscript(client: RespClient) -> None:
    """A SHA Redis does not know is NoScriptError, as with redis-py."""
    with pytest.raises(NoScriptError):
        await client.evalsha("0" * 40, 0)


async def test_error_replies_raise_and_leave_the_connection_usable(
    client: RespClient, plain: aioredis.Redis
) -> None:
    """A Redis error reply fails only its own call."""
    await plain.set("resp:ok", b"1")
    sha = await client.script_load("return redis.call('INCR', KEYS[1])")
    await plain.set("resp:text", b"not a number")
    with pytest.raises(ResponseError):
        await client.evalsha(sha, 1, "resp:text")
    assert await client.get("resp:ok") == b"1"


async def test_reconnects_after_redis_restarts(tmp_path_factory: pytest.TempPathFactory) -> None:
    """After Redis restarts the client reconnects; at most the first call fails."""
    base = tmp_path_factory.mktemp("resp-redis")
    server = Service(RedisServer(data_dir=base, log_dir=base))
    server.start()
    client = RespClient(url=server.launcher.url, timeout_s=2.0)
    try:
        assert await client.get("k") is None
        server.restart()
        with contextlib.suppress(RedisConnectionError):
            await client.get("k")
        assert await client.get("k") is None
    finally:
        await client.aclose()
        server.stop()


async def test_times_out_when_redis_does_not_answer() -> None:
    """A server that accepts but never replies gives TimeoutError within the timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = RespClient(url=f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
        try:
            with pytest.raises(RedisTimeoutError):
                await client.get("k")
        finally:
            await client.aclose()


async def test_replaces_a_connection_whose_replies_stopped() -> None:
    """Callers that gave up leave a stalled connection; the next call opens a new one."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = RespClient(url=f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.get("k"), 0.05)  # the caller's own, shorter limit
        await asyncio.sleep(0.25)
        with pytest.raises(RedisTimeoutError):
            await client.get("k")
        assert len(accepted) == 2
    finally:
        await client.aclose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_limiter_fails_closed_through_the_lean_client() -> None:
    """Admission over an unreachable lean client is StoreUnavailable, never an allow."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hot = RespClient(url=f"redis://127.0.0.1:{port}/0", timeout_s=0.5)

    async def never(_: KeyRecord) -> None:
        raise AssertionError("the tenant loader must not be reached")

    cold = aioredis.Redis.from_url(f"redis://127.0.0.1:{port}/0")
    limiter = Limiter(
        redis=cold,
        load_tenant=never,
        lease_ttl_s=60,
        timeout_s=0.5,
        hot=hot,
    )
    record = KeyRecord(
        key_id="k",
        prefix="nz_abcdefgh",
        tenant_id="t",
        tenant_name="t",
        digest="d",
        expires_at=None,
        revoked=False,
        key_limits=Limits(),
        tenant_limits=Limits(),
    )
    try:
        with pytest.raises(StoreUnavailable):
            await limiter.admit(record, request_id="r", reserve=1)
    finally:
        await hot.aclose()
        await cold.aclose()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", []),
        ("redis://:s%40cret@127.0.0.1:6379/2", [(b"AUTH", b"s@cret"), (b"SELECT", b"2")]),
        ("redis://nz:pw@127.0.0.1/0", [(b"AUTH", b"nz", b"pw")]),
        ("unix:///run/redis.sock?db=5", [(b"SELECT", b"5")]),
    ],
)
def test_handshake_follows_the_url(url: str, expected: list[tuple[bytes, ...]]) -> None:
    """A new lean connection authenticates and selects the database as the URL says."""
    address = redis_address(url)
    assert address is not None
    assert address.handshake() == [encode_command(*parts) for parts in expected]
    assert "pw" not in repr(address)
    assert "cret" not in repr(address)

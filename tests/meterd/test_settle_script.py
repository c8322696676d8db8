"""settle_script.py: a batch of script calls per round trip, lean or through redis-py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_errors

from meterd.daemon import is_outage
from meterd.settle_script import SettleScript
from tests.meterd.conftest import settler

# Echoes its arguments, so a reply shows which call it answers.
_ECHO = "return {KEYS[1], ARGV[1], ARGV[2]}"


def _calls(n: int) -> list[tuple[list[str], list[str | int]]]:
    return [([f"k{i}"], [f"arg-{i}", i]) for i in range(n)]


@pytest.fixture(params=["lean", "redis-py"])
async def echo(
    request: pytest.FixtureRequest, redis: aioredis.Redis, redis_url: str
) -> AsyncIterator[SettleScript]:
    """The echo script through the lean client, or through redis-py (a URL option it keeps)."""
    url = redis_url if request.param == "lean" else f"{redis_url}?socket_timeout=5"
    script = SettleScript(source=_ECHO, redis_url=url, redis=redis, timeout_s=5)
    yield script
    await script.aclose()


async def test_replies_come_back_in_order(echo: SettleScript) -> None:
    """Every call of a large batch gets its own reply, in the order of the calls."""
    replies = await echo.run(_calls(2000))
    assert replies == [
        [f"k{i}".encode(), f"arg-{i}".encode(), str(i).encode()] for i in range(2000)
    ]
    assert await echo.run([]) == []


async def test_a_flushed_script_is_loaded_again(echo: SettleScript, redis: aioredis.Redis) -> None:
    """After Redis lost its scripts (restart, SCRIPT FLUSH) the refused calls are sent again."""
    await echo.run(_calls(1))
    await redis.script_flush()
    replies = await echo.run(_calls(3))
    assert [reply[1] for reply in replies] == [b"arg-0", b"arg-1", b"arg-2"]


async def test_non_ascii_arguments_are_counted_in_bytes(echo: SettleScript) -> None:
    """An argument outside ASCII still arrives intact (RESP lengths count bytes)."""
    (reply,) = await echo.run([(["kö"], ["ünïcode", 1])])
    assert reply == ["kö".encode(), "ünïcode".encode(), b"1"]


async def test_a_script_redis_refuses_is_a_bug_not_an_outage(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """A script error raises redis-py's ResponseError, which the daemon does not retry."""
    broken = SettleScript(source="return {", redis_url=redis_url, redis=redis, timeout_s=5)
    try:
        with pytest.raises(redis_errors.ResponseError) as caught:
            await broken.run(_calls(1))
        assert not is_outage(caught.value)
    finally:
        await broken.aclose()


async def test_redis_down_is_an_outage(redis: aioredis.Redis) -> None:
    """No Redis to talk to raises redis-py's ConnectionError, which the daemon retries."""
    dead = settler(redis, "redis://127.0.0.1:1/0", timeout_s=1)
    try:
        with pytest.raises(redis_errors.ConnectionError) as caught:
            await dead.run(_calls(1))
        assert is_outage(caught.value)
    finally:
        await dead.aclose()


async def test_calls_from_two_tasks_keep_their_replies(echo: SettleScript) -> None:
    """The meter loop and the sweep share the connection; neither gets the other's replies."""
    first, second = await asyncio.gather(echo.run(_calls(300)), echo.run(_calls(5)))
    assert [reply[1] for reply in first] == [f"arg-{i}".encode() for i in range(300)]
    assert [reply[1] for reply in second] == [f"arg-{i}".encode() for i in range(5)]


async def test_the_url_database_is_used(redis: aioredis.Redis, redis_url: str) -> None:
    """The lean client selects the database the URL names, as redis-py does."""
    url = redis_url.rsplit("/", 1)[0] + "/3"
    setter = SettleScript(
        source="redis.call('SET', KEYS[1], ARGV[1]) return 1",
        redis_url=url,
        redis=redis,
        timeout_s=5,
    )
    other = aioredis.Redis.from_url(url)
    try:
        assert await setter.run([(["where"], ["db3", 0])]) == [1]
        assert await other.get("where") == b"db3"
        assert await redis.get("where") is None
    finally:
        await setter.aclose()
        await other.aclose()

"""The limits layer's settle script for a whole batch: one write, one round trip.

redis-py spends 50-150 µs of CPU per pipelined command (packing, its script object's
SCRIPT EXISTS on every execute, a coroutine per reply), more than everything else
meterd does per request. Here a batch's EVALSHA commands are encoded into one buffer,
written at once, and their replies parsed straight from the socket's bytes.

The lean connection speaks RESP2 to the `redis://` and `unix://` URLs that
`policyd.shared.resp.supports()` accepts (password and database included); anything else
(TLS, other options) goes through redis-py's pipeline, so its settings keep their
meaning. Either way errors are redis-py's exception classes, so the daemon tells
outages from bugs alike. The script is called by its SHA1; when Redis does not know it
(a restart, SCRIPT FLUSH) it is loaded and the calls it refused are sent again.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any, Final

import redis.asyncio as aioredis
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from policyd.shared.resp import (
    ROLE_COMMAND,
    IncompleteReply,
    Locate,
    RedisAddress,
    check_role,
    encode_command,
    parse_reply,
    redis_address,
)

__all__ = ["Call", "SettleScript"]

#: KEYS and ARGV of one script call, as `policyd.shared.contract.settle_call` returns them.
Call = tuple[Sequence[str], Sequence[str | int]]

_READ_BYTES: Final = 256 * 1024
# Error replies by their first word, as redis-py classifies them (the daemon retries
# its connection errors, such as a refused password, like an outage).
_ERRORS: Final[dict[str, type[RedisError]]] = {
    "NOSCRIPT": NoScriptError,
    "LOADING": BusyLoadingError,
    "READONLY": ReadOnlyError,
    "NOAUTH": AuthenticationError,
    "WRONGPASS": AuthenticationError,
}


def _evalsha(head: str, keys: Sequence[str], args: Sequence[str | int]) -> str:
    """EVALSHA as RESP text; `head` holds the command name and the script's SHA1.

    Built as text and encoded once per batch, a third of the cost of encoding each
    argument; the lengths are right because the arguments are ASCII (checked by caller).
    """
    parts = [f"*{len(keys) + len(args) + 3}\r\n{head}${len(str(len(keys)))}\r\n{len(keys)}\r\n"]
    for part in (*keys, *args):
        text = str(part)
        parts.append(f"${len(text)}\r\n{text}\r\n")
    return "".join(parts)


def _error(message: str) -> RedisError:
    return _ERRORS.get(message.partition(" ")[0], ResponseError)(message)


class _Connection:
    """One RESP2 connection: send many commands at once, read their replies in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, address: RedisAddress, *, primary_only: bool = False) -> _Connection:
        if address.path is not None:
            reader, writer = await asyncio.open_unix_connection(address.path)
        else:
            reader, writer = await asyncio.open_connection(address.host, address.port)
        conn = cls(reader, writer)
        try:
            handshake = address.handshake()
            if primary_only:  # found through Sentinel: make sure it still is the primary
                handshake.append(ROLE_COMMAND)
            for reply in await conn.exchange(b"".join(handshake), len(handshake)):
                if isinstance(reply, Exception):
                    raise reply
            if primary_only:
                check_role(reply)
        except BaseException:
            conn.close()
            raise
        return conn

    async def exchange(self, payload: bytes, replies: int) -> list[Any]:
        """Write `payload` (holding `replies` commands) and read that many replies."""
        if not replies:
            return []
        self._writer.write(payload)
        await self._writer.drain()
        found: list[Any] = []
        buf = b""
        pos = 0
        while len(found) < replies:
            chunk = await self._reader.read(_READ_BYTES)
            if not chunk:
                raise RedisConnectionError("redis closed the connection")
            buf = buf[pos:] + chunk if pos else buf + chunk
            pos = 0
            try:
                while len(found) < replies:
                    value, pos = parse_reply(buf, pos, _error)
                    found.append(value)
            except IncompleteReply:
                pass
        if pos != len(buf):
            raise RedisConnectionError("redis sent more replies than commands")
        return found

    def close(self) -> None:
        self._writer.close()


class SettleScript:
    """Runs one Lua script (the settle script) for many calls per round trip."""

    def __init__(
        self,
        *,
        source: str,
        redis_url: str,
        redis: aioredis.Redis,
        timeout_s: float,
        locate: Locate | None = None,
    ) -> None:
        self._source = source
        self._sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
        self._head = f"$7\r\nEVALSHA\r\n${len(self._sha)}\r\n{self._sha}\r\n"
        # The lean connection where the URL allows one, else redis-py's pipeline.
        self._address = redis_address(redis_url)
        #: With Sentinels: where the primary is, asked on every new connection.
        self._locate = locate
        self._redis = redis
        self._timeout_s = timeout_s
        self._conn: _Connection | None = None
        # The meter loop and the sweep share the connection; replies must stay in order.
        self._lock = asyncio.Lock()

    async def run(self, calls: Sequence[Call]) -> list[Any]:
        """The script's reply to each call, in order; raises the first error reply."""
        if not calls:
            return []
        replies = await self._send(calls)
        refused = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if refused:
            loaded, *again = await self._send([calls[i] for i in refused], load=True)
            if isinstance(loaded, Exception):
                raise loaded
            for i, reply in zip(refused, again, strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, ReadOnlyError):
                # The primary was demoted (a failover): the next batch must find the new one.
                await self.aclose()
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def aclose(self) -> None:
        """Close the lean connection (redis-py's client is the caller's to close)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _send(self, calls: Sequence[Call], *, load: bool = False) -> list[Any]:
        """EVALSHA per call in one round trip; `load`: SCRIPT LOAD first (its reply first)."""
        if self._address is None:
            pipe = self._redis.pipeline(transaction=False)
            if load:
                pipe.script_load(self._source)
            for keys, args in calls:
                pipe.evalsha(self._sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))
        text = "".join(_evalsha(self._head, keys, args) for keys, args in calls)
        payload = text.encode()
        if len(payload) != len(text):  # not ASCII after all: lengths must count bytes
            payload = b"".join(
                encode_command(b"EVALSHA", self._sha, len(k), *k, *a) for k, a in calls
            )
        commands = len(calls)
        if load:
            payload = encode_command(b"SCRIPT", b"LOAD", self._source) + payload
            commands += 1
        async with self._lock:
            try:
                async with asyncio.timeout(self._timeout_s):
                    if self._conn is None:
                        address = self._address
                        if self._locate is not None:
                            address = await self._locate(address)
                        self._conn = await _Connection.open(
                            address, primary_only=self._locate is not None
                        )
                    return await self._conn.exchange(payload, commands)
            except BaseException as exc:
                # Replies may still be on their way: the connection cannot be trusted.
                await self.aclose()
                if isinstance(exc, TimeoutError):
                    raise RedisTimeoutError("redis did not answer in time") from exc
                if isinstance(exc, OSError | EOFError):
                    raise RedisConnectionError(f"redis: {exc}") from exc
                if isinstance(exc, ValueError) and not isinstance(exc, RedisError):
                    raise RedisConnectionError(f"bad reply from redis: {exc}") from exc
                raise

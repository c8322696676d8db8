"""A lean Redis client for the two commands on the hot path: GET and EVALSHA.

redis-py's asyncio client spent ~150 µs of CPU per command on the development VM
(pool locks, timeouts, retries, packing 37 arguments) against ~40 µs for a bare round
trip: a third of a whole decision (docs/performance.md). This
client keeps one connection, writes each command as soon as it is made and matches
replies in order (pipelining: concurrent decisions share round trips), and parses
replies in `data_received` without a coroutine per element.

It speaks RESP2 to `redis://` and `unix://` URLs with an optional password and database;
anything else (TLS, query options) stays with redis-py, so its settings keep their exact
meaning (`supports()` says which). Errors are redis-py's exception classes, so callers
catch one family whichever client answered.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = [
    "ROLE_COMMAND",
    "IncompleteReply",
    "Locate",
    "RedisAddress",
    "RespClient",
    "check_role",
    "encode_command",
    "parse_reply",
    "redis_address",
    "supports",
]

_CRLF: Final = b"\r\n"
_SCHEMES: Final = frozenset({"redis", "unix"})


def encode_command(*parts: bytes | str | int) -> bytes:
    """One command as a RESP array of bulk strings."""
    # One growing buffer and exact type checks: the admission call has ~40 parts and
    # this ran ~35% faster than a list of chunks joined with isinstance() per part.
    out = bytearray(b"*%d\r\n" % len(parts))
    for part in parts:
        if type(part) is str:
            data = part.encode()
        elif type(part) is bytes:
            data = part
        else:  # an int (or anything else) as its decimal text
            data = str(part).encode()
        out += b"$%d\r\n%b\r\n" % (len(data), data)
    return bytes(out)


@attrs.frozen(kw_only=True)
class RedisAddress:
    """Where a lean client connects, and how it introduces itself."""

    host: str  # unused for a unix socket
    port: int
    path: str | None
    username: str | None
    password: str | None = attrs.field(repr=False)
    db: int

    def handshake(self) -> list[bytes]:
        """The commands a new connection sends first: AUTH and SELECT, where the URL asks."""
        commands = []
        if self.password is not None:
            auth = (self.username, self.password) if self.username else (self.password,)
            commands.append(encode_command(b"AUTH", *auth))
        if self.db:
            commands.append(encode_command(b"SELECT", self.db))
        return commands


def redis_address(url: str) -> RedisAddress | None:
    """The address of a `redis://` or `unix://` URL; None for anything a lean client
    leaves to redis-py (TLS, URL options other than `db`, malformed numbers)."""
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        return None
    query = parse_qs(parts.query)
    if set(query) - {"db"}:
        return None
    unix = parts.scheme == "unix"
    # redis://host:port/<db> or ?db=<db>; unix:///path/to.sock?db=<db>.
    db_text = query.get("db", [""])[0] or ("" if unix else parts.path.strip("/"))
    try:
        db = int(db_text or 0)
        port = parts.port or 6379
    except ValueError:  # a malformed db or port: let redis-py report it
        return None
    return RedisAddress(
        host="" if unix else parts.hostname or "localhost",
        port=port,
        path=parts.path if unix else None,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        db=db,
    )


#: ROLE, sent on every new connection to a primary found through Sentinel.
ROLE_COMMAND: Final = encode_command(b"ROLE")


def check_role(reply: object) -> None:
    """ROLE's reply must say `master`: a replica (or a demoted primary) is an outage."""
    role = reply[0] if isinstance(reply, list) and reply else None
    if role != b"master":
        raise RedisConnectionError(f"connected to a Redis {role!r}, not the primary")


def supports(url: str) -> bool:
    """Whether this client can talk to `url` (otherwise use redis-py)."""
    return redis_address(url) is not None


class IncompleteReply(Exception):
    """The buffer ends inside a reply; wait for more bytes."""


class _ErrorReply:
    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def exception(self) -> ResponseError:
        if self.message.startswith("NOSCRIPT"):
            return NoScriptError(self.message)
        if self.message.startswith("READONLY"):
            return ReadOnlyError(self.message)
        return ResponseError(self.message)


def parse_reply(
    buf: bytes | bytearray, pos: int, error: Callable[[str], Any] = _ErrorReply
) -> tuple[Any, int]:
    """One RESP2 reply starting at `pos`: (value, position after it).

    Raises IncompleteReply when `buf` ends inside it. An error reply becomes
    `error(message)`, so each caller decides how errors travel (meterd's batch client
    maps them to redis-py's exception classes).
    """
    end = buf.find(_CRLF, pos)
    if end < 0:
        raise IncompleteReply
    kind = buf[pos]
    if kind == 0x3A:  # ':' integer
        return int(buf[pos + 1 : end]), end + 2
    if kind == 0x24:  # '$' bulk string
        size = int(buf[pos + 1 : end])
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(buf) < stop + 2:
            raise IncompleteReply
        return bytes(buf[end + 2 : stop]), stop + 2
    if kind == 0x2A:  # '*' array
        count = int(buf[pos + 1 : end])
        if count < 0:
            return None, end + 2
        items = []
        pos = end + 2
        for _ in range(count):
            item, pos = parse_reply(buf, pos, error)
            items.append(item)
        return items, pos
    if kind == 0x2B:  # '+' simple string
        return bytes(buf[pos + 1 : end]), end + 2
    if kind == 0x2D:  # '-' error
        return error(bytes(buf[pos + 1 : end]).decode("utf-8", "replace")), end + 2
    raise RedisConnectionError(f"unexpected RESP type byte {kind!r}")


class _Protocol(asyncio.Protocol):
    """One connection: replies resolve the waiting futures in the order sent."""

    def __init__(self) -> None:
        self._buf = bytearray()
        # Callers waiting for a reply, oldest first, with the loop time of their command.
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio's.
        self._transport = cast(asyncio.Transport, transport)

    def send(self, payload: bytes) -> asyncio.Future[Any]:
        if self.closed or self._transport is None:
            raise RedisConnectionError("redis connection closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting.append((future, loop.time()))
        self._transport.write(payload)
        return future

    def stalled(self, now: float, limit_s: float) -> bool:
        """Whether the oldest command has waited longer than `limit_s` for its reply."""
        return bool(self._waiting) and now - self._waiting[0][1] > limit_s

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        demoted = False
        try:
            while pos < len(buf):
                value, pos_after = parse_reply(buf, pos)
                pos = pos_after
                if not self._waiting:
                    raise RedisConnectionError("reply without a request")
                future, _ = self._waiting.popleft()
                if future.done():  # its caller gave up (timeout); the reply is dropped
                    continue
                if isinstance(value, _ErrorReply):
                    future.set_exception(value.exception())
                    # The primary was demoted under us (a failover): never write here again.
                    demoted = demoted or value.message.startswith("READONLY")
                else:
                    future.set_result(value)
        except IncompleteReply:
            pass
        except (RedisError, ValueError) as exc:
            self.abort(RedisConnectionError(f"bad reply from redis: {exc}"))
            return
        del buf[:pos]
        if demoted:
            self.abort(RedisConnectionError("redis is no longer the primary"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"redis connection lost: {exc or 'closed'}"))

    def abort(self, exc: Exception) -> None:
        """Close now and fail every waiting caller with `exc`."""
        self._fail(exc)
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, exc: Exception) -> None:
        self.closed = True
        while self._waiting:
            future, _ = self._waiting.popleft()
            if not future.done():
                future.set_exception(exc)


#: Where to connect now, given the URL's address (Sentinel: the current primary).
Locate = Callable[[RedisAddress], Awaitable[RedisAddress]]


class RespClient:
    """GET and EVALSHA over one pipelined connection, reconnecting after any failure.

    With `locate` (Redis behind Sentinel) each new connection goes where `locate` says
    and is used only if ROLE says it reached the primary.
    """

    def __init__(self, *, url: str, timeout_s: float, locate: Locate | None = None) -> None:
        address = redis_address(url)
        if address is None:
            raise ValueError("unsupported Redis URL for the lean client; use redis-py")
        self._address = address
        self._locate = locate
        self._timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()

    async def get(self, key: str) -> bytes | None:
        """GET `key`."""
        value = await self.call(encode_command(b"GET", key))
        return value if value is None else bytes(value)

    async def script_load(self, script: str) -> str:
        """SCRIPT LOAD `script`; returns its SHA1."""
        sha = await self.call(encode_command(b"SCRIPT", b"LOAD", script))
        return bytes(sha).decode()

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: bytes | str | int) -> Any:
        """EVALSHA; raises NoScriptError when Redis lost the script."""
        return await self.call(encode_command(b"EVALSHA", sha, numkeys, *keys_and_args))

    async def call(self, payload: bytes) -> Any:
        """Send an encoded command and wait for its reply (at most `timeout_s` in all)."""
        try:
            async with asyncio.timeout(self._timeout_s):
                protocol = await self._connected()
                return await protocol.send(payload)
        except TimeoutError:
            # The connection's replies can no longer be trusted to arrive: start afresh.
            if self._protocol is not None:
                self._protocol.abort(RedisTimeoutError("redis did not answer in time"))
                self._protocol = None
            raise RedisTimeoutError("redis did not answer in time") from None
        except OSError as exc:
            raise RedisConnectionError(f"redis: {exc}") from exc

    async def aclose(self) -> None:
        """Close the connection (waiting callers get ConnectionError)."""
        if self._protocol is not None:
            self._protocol.abort(RedisConnectionError("client closed"))
            self._protocol = None

    async def _connected(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            if not protocol.stalled(asyncio.get_running_loop().time(), self._timeout_s):
                return protocol
            # Callers that gave up (their own timeout, a cancelled request) left a reply
            # outstanding for too long: the connection is hung, so replace it.
            protocol.abort(RedisTimeoutError("redis did not answer in time"))
            self._protocol = None
        async with self._connecting:
            protocol = self._protocol
            if protocol is not None and not protocol.closed:
                return protocol
            protocol = await self._connect()
            self._protocol = protocol
            return protocol

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        address = self._address if self._locate is None else await self._locate(self._address)
        if address.path is not None:
            _, protocol = await loop.create_unix_connection(_Protocol, address.path)
        else:
            _, protocol = await loop.create_connection(_Protocol, address.host, address.port)
        try:
            for command in address.handshake():
                await protocol.send(command)
            if self._locate is not None:
                check_role(await protocol.send(ROLE_COMMAND))
        except BaseException:
            protocol.abort(RedisConnectionError("redis handshake failed"))
            raise
        return protocol

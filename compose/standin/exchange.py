"""One HTTP exchange on the raw ASGI interface: the request as received, the reply as sent.

No web framework: the stand-in has to control status lines, header sets and chunk
boundaries exactly, and a framework would add its own opinions (and its own cost).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Iterable, MutableMapping
from typing import Any, Final

from compose.standin.recorder import RequestRecord

__all__ = [
    "HTML_UTF8",
    "JSON",
    "JSON_UTF8",
    "NDJSON",
    "SSE",
    "TEXT",
    "TEXT_UTF8",
    "ASGIReceive",
    "ASGIScope",
    "ASGISend",
    "Exchange",
    "Header",
    "read_body",
]

ASGIScope = MutableMapping[str, Any]
ASGIReceive = Callable[[], Awaitable[MutableMapping[str, Any]]]
ASGISend = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Header = tuple[bytes, bytes]

# Content types exactly as Ollama's Go code sets them.
JSON_UTF8: Final = b"application/json; charset=utf-8"  # gin's c.JSON
JSON: Final = b"application/json"  # the OpenAI writers, and early stream errors
NDJSON: Final = b"application/x-ndjson"
SSE: Final = b"text/event-stream"
TEXT: Final = b"text/plain"  # gin's default 404/405 bodies
TEXT_UTF8: Final = b"text/plain; charset=utf-8"  # gin's c.String
HTML_UTF8: Final = b"text/html; charset=utf-8"  # Go's http.Redirect for GET

_CONTENT_TYPE: Final = b"content-type"
_CONTENT_LENGTH: Final = b"content-length"


async def read_body(receive: ASGIReceive) -> tuple[bytes, bool]:
    """The whole request body, and whether the client went away while sending it."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


class Exchange:
    """The request (method, decoded and raw path, headers, body) and ways to answer it."""

    __slots__ = (
        "_receive",
        "_send",
        "body",
        "extra_headers",
        "headers",
        "method",
        "path",
        "query",
        "raw_path",
        "received_ns",
        "record",
        "scope",
        "started",
    )

    def __init__(
        self,
        scope: ASGIScope,
        receive: ASGIReceive,
        send: ASGISend,
        *,
        body: bytes,
        record: RequestRecord,
        received_ns: int,
    ) -> None:
        self.scope: Final = scope
        self._receive: Final = receive
        self._send: Final = send
        self.body: Final = body
        self.record: Final = record
        #: Monotonic time the request arrived (Ollama's total_duration starts here).
        self.received_ns: Final = received_ns
        self.method: Final[str] = scope["method"]
        self.path: Final[str] = scope["path"]
        self.raw_path: Final = record.raw_path
        self.query: Final = record.query
        self.headers: Final = record.headers
        #: Sent with every response (CORS headers added by the middleware step).
        self.extra_headers: list[Header] = []
        self.started = False

    def header(self, name: str) -> str:
        """A request header by lower-case name ("" when absent, like Go's Header.Get)."""
        return self.headers.get(name, "")

    async def _start(self, status: int, headers: Iterable[Header]) -> None:
        self.started = True
        self.record.status = status
        await self._send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, *self.extra_headers],
            }
        )

    async def respond(
        self,
        status: int,
        body: bytes = b"",
        *,
        content_type: bytes | None = None,
        headers: Iterable[Header] = (),
    ) -> None:
        """A complete response with Content-Length (a HEAD gets the headers only)."""
        fields = [(_CONTENT_TYPE, content_type)] if content_type else []
        fields.extend(headers)
        fields.append((_CONTENT_LENGTH, str(len(body)).encode()))
        await self._start(status, fields)
        payload = b"" if self.method == "HEAD" else body
        await self._send({"type": "http.response.body", "body": payload, "more_body": False})

    async def start_stream(self, status: int, *, content_type: bytes) -> None:
        """Begin a chunked response (no Content-Length), as Go does for streamed replies."""
        await self._start(status, [(_CONTENT_TYPE, content_type)])

    async def write(self, data: bytes) -> None:
        """Send one chunk of a streamed response."""
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end_stream(self, data: bytes = b"") -> None:
        """Send the last chunk of a streamed response."""
        await self._send({"type": "http.response.body", "body": data, "more_body": False})

    async def _disconnected(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass

    async def unless_disconnected(self, work: Coroutine[Any, Any, None]) -> bool:
        """Run `work`, cancelling it if the client disconnects; False if that happened.

        Granian's `send` does not fail once the peer is gone, but `receive` reports it, so
        a watcher task is what stops a generation for a client that left.
        """
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(self._disconnected())
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            task.result()
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self.record.disconnected = True
        return False

"""A minimal HTTP/1.1 client on asyncio streams: just enough for load generation.

A client library would spend more CPU per request than the gateway does; on a 2-core
machine that CPU comes out of the parts being measured. Requests are pre-built bytes and
responses are only framed (status, length or chunks), never decoded.
"""

from __future__ import annotations

import asyncio
from typing import Final

import attrs

__all__ = ["Reply", "build_request", "read_chunk", "read_head", "read_reply"]

_HEAD_END: Final = b"\r\n\r\n"


@attrs.frozen
class Reply:
    """Status, body size, and whether the server keeps the connection open."""

    status: int
    body_bytes: int
    keep_alive: bool


def build_request(
    method: str, target: str, *, host: str, headers: dict[str, str], body: bytes = b""
) -> bytes:
    """The request's bytes, with Host and (for a body) Content-Length added."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    """Status code and lower-cased headers of the next response on `reader`."""
    head = await reader.readuntil(_HEAD_END)
    status_line, *lines = head[:-4].split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(b" ", 2)[1]), headers


async def read_chunk(reader: asyncio.StreamReader) -> bytes:
    """One chunk of a chunked body; b"" for the last (its trailers are consumed)."""
    size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
    if size == 0:
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass
        return b""
    data = await reader.readexactly(size + 2)
    return data[:-2]


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    """Read one whole response; the body is counted, not kept."""
    status, headers = await read_head(reader)
    keep_alive = headers.get(b"connection", b"").lower() != b"close"
    if b"content-length" in headers:
        size = int(headers[b"content-length"])
        await reader.readexactly(size)
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        size = 0
        while chunk := await read_chunk(reader):
            size += len(chunk)
    else:
        size = len(await reader.read())
        keep_alive = False
    return Reply(status=status, body_bytes=size, keep_alive=keep_alive)

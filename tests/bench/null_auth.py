"""A forward_auth responder that decides nothing: the floor of the design's auth hop.

Granian serves it exactly as it serves policyd (same launcher and flags). It answers
every request at once with the headers policyd gives an admitted small chat, so Caddy
does all of its forward_auth work (the sub-request, copy_headers, log fields, capturing
the reply) while no key is checked and no limit counted. Scenario 1's `b2_null_auth`
runs the gateway's own Caddyfile against it: b2 - b is what the auth hop costs by
itself on this machine, c - b2 what policyd's decision (and meterd) add to it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

from policyd.contract import (
    H_CAPTURE,
    H_KEY_ID,
    H_KEY_PREFIX,
    H_MODEL,
    H_PROMPT_LOG,
    H_RESERVED,
    H_STREAM,
    H_SURFACE,
    H_TENANT_ID,
)

__all__ = ["create_app"]

_Message = MutableMapping[str, Any]
_App = Callable[
    [_Message, Callable[[], Awaitable[_Message]], Callable[[_Message], Awaitable[None]]],
    Awaitable[None],
]

_VERDICT: Final = [
    (name.lower().encode(), value.encode())
    for name, value in (
        (H_KEY_ID, "00000000-0000-4000-8000-000000000001"),
        (H_KEY_PREFIX, "nz_nullauth"),
        (H_TENANT_ID, "00000000-0000-4000-8000-000000000002"),
        (H_SURFACE, "ollama"),
        (H_MODEL, "llama3.2"),
        (H_STREAM, "0"),
        (H_CAPTURE, "1"),
        (H_RESERVED, "15"),
        (H_PROMPT_LOG, "0"),
    )
] + [(b"content-length", b"0")]


async def _allow_everything(
    scope: _Message,
    receive: Callable[[], Awaitable[_Message]],
    send: Callable[[_Message], Awaitable[None]],
) -> None:
    if scope["type"] != "http":
        return  # lifespan: nothing to open
    await send({"type": "http.response.start", "status": 200, "headers": _VERDICT})
    await send({"type": "http.response.body", "body": b""})


def create_app() -> _App:
    """The ASGI app (a factory, as Granian is told `--factory` for policyd)."""
    return _allow_everything

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

from policyd.shared.contract import H_GRANT, Grant

__all__ = ["create_app"]

_Message = MutableMapping[str, Any]
_App = Callable[
    [_Message, Callable[[], Awaitable[_Message]], Callable[[_Message], Awaitable[None]]],
    Awaitable[None],
]

_GRANT: Final = Grant(
    key_id="00000000-0000-4000-8000-000000000001",
    key_prefix="nz_nullauth",
    tenant_id="00000000-0000-4000-8000-000000000002",
    surface="ollama",
    stream=False,
    capture=True,
    reserved=15,
    model="llama3.2",
)
_VERDICT: Final = [
    (H_GRANT.lower().encode(), _GRANT.encode().encode()),
    (b"content-length", b"0"),
]


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

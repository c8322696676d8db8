"""The ASGI application Granian serves: `/authz` directly, everything else via Litestar.

Every proxied request costs one `/authz` call (and a `/authz/key` call first when Caddy
has no cheap bound for its body), so both skip the framework: no routing
table, signature model, middleware stack or response object, just five headers read
from the scope and two ASGI messages sent. Profiling showed Litestar's share of a
decision larger than the decision itself. The probes and `/statsz` stay in Litestar,
which also runs the lifespan that opens the stores (`app.state.services`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

from litestar import Litestar

from policyd.authz import metrics
from policyd.authz.decision import decide_authz, decide_key
from policyd.authz.services import Services
from policyd.shared.contract import AUTHZ_KEY_PATH, AUTHZ_PATH, H_BODY, H_CLIENT, H_REQUEST_ID

__all__ = ["PolicyApp"]

_log = logging.getLogger("policyd.authz")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# forward_auth's headers we read, by their lower-case wire name; the first copy counts.
_AUTHORIZATION: Final = 0
_METHOD: Final = 1
_TARGET: Final = 2
_BODY: Final = 3
_REQUEST_ID: Final = 4
_CLIENT: Final = 5
_WANTED: Final = {
    b"authorization": _AUTHORIZATION,
    b"x-forwarded-method": _METHOD,
    b"x-forwarded-uri": _TARGET,
    H_BODY.lower().encode(): _BODY,
    H_REQUEST_ID.lower().encode(): _REQUEST_ID,
    H_CLIENT.lower().encode(): _CLIENT,
}
_AUTHZ_PATHS: Final = frozenset({AUTHZ_PATH, AUTHZ_KEY_PATH})
_NOT_ALLOWED: Final = {
    "type": "http.response.start",
    "status": 405,
    "headers": [(b"allow", b"GET"), (b"content-length", b"0")],
}
_FAILED: Final = b'{"error":"the gateway could not decide on this request"}'


class PolicyApp:
    """`/authz` without a framework in front of the Litestar app that serves the rest."""

    def __init__(self, litestar: Litestar) -> None:
        self.litestar: Final = litestar
        self._services: Services | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in _AUTHZ_PATHS:
            await self._authz(scope, send)
        else:
            await self.litestar(scope, receive, send)  # type: ignore[arg-type]

    def _services_now(self) -> Services:
        # Set by the Litestar lifespan before Granian accepts the first request.
        if self._services is None:
            self._services = self.litestar.state.services
        return self._services

    async def _authz(self, scope: Scope, send: Send) -> None:
        if scope["method"] != "GET":
            await send(_NOT_ALLOWED)
            await send({"type": "http.response.body", "body": b""})
            return
        found: list[bytes | None] = [None, None, None, None, None, None]
        for name, value in scope["headers"]:
            index = _WANTED.get(name)
            if index is not None and found[index] is None:
                found[index] = value
        authorization, method, target, body, request_id, client = (
            None if raw is None else raw.decode("latin-1") for raw in found
        )
        started = time.perf_counter()
        try:
            if scope["path"] == AUTHZ_KEY_PATH:
                verdict = await decide_key(
                    self._services_now(),
                    method=method or "",
                    target=target or "",
                    authorization=authorization,
                    request_id=request_id or "",
                )
            else:
                verdict = await decide_authz(
                    self._services_now(),
                    method=method or "",
                    target=target or "",
                    body=body,
                    authorization=authorization,
                    request_id=request_id or "",
                )
        except Exception as exc:
            # A bug, not a store outage (those are 503 refusals): refuse, never allow.
            metrics.failed(exc, time.perf_counter() - started)
            _log.exception("deciding %s failed", request_id or "a request")
            await _respond(send, 500, [("content-type", "application/json")], _FAILED)
            return
        # A passed key check decides nothing: the request's /authz call is counted.
        if verdict.code is not None or scope["path"] != AUTHZ_KEY_PATH:
            metrics.decided(verdict.code, verdict.surface, time.perf_counter() - started)
        if verdict.auth_failed:
            # A client that keeps failing waits for its answer (the loop it would run
            # costs every tenant CPU); a first failure is answered at once.
            await self._services_now().tarpit.hold(client, repeated=verdict.repeated)
        await _respond(send, verdict.status, verdict.headers, verdict.body)


async def _respond(send: Send, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
    raw = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})

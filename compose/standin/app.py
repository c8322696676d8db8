"""The stand-in as a plain ASGI application; `create_app()` is Granian's factory.

Request path, in Ollama's order: net/http rejects a malformed request-target (400),
ServeMux cleans the path (301 for `//`, `/./`,
`/../`), gin looks the route up (trailing-slash redirect before any middleware), then the
CORS and Host middlewares run, then the handler or gin's 404/405 text. Every request is
recorded first (except `/__standin/*`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import time
from collections.abc import Mapping
from typing import Final

from compose.standin.exchange import (
    HTML_UTF8,
    TEXT,
    TEXT_UTF8,
    ASGIReceive,
    ASGIScope,
    ASGISend,
    Exchange,
    read_body,
)
from compose.standin.gojson import go_time
from compose.standin.hosts import cors_verdict, host_verdict
from compose.standin.introspection import PREFIX, Introspection
from compose.standin.mutations import MutationApi
from compose.standin.native import NativeApi
from compose.standin.openai_compat import OpenAIApi
from compose.standin.recorder import RequestRecord
from compose.standin.router import Router, clean_path, escaped_path, redirect_target
from compose.standin.settings import StandinSettings
from compose.standin.state import ServerState

__all__ = ["StandinApp", "create_app"]

_STATUS_TEXT: Final = {301: "Moved Permanently", 307: "Temporary Redirect"}
#: A `%` not followed by two hex digits: Go's URL parser rejects the request-target.
_BAD_ESCAPE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_HTML_ESCAPES: Final = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&#34;", "'": "&#39;"}
)


def _checks_host(scope: ASGIScope) -> bool:
    # Ollama checks Host unless it listens on a parseable, non-loopback IP address.
    server = scope.get("server")
    if not server:
        return True
    try:
        return ipaddress.ip_address(server[0]).is_loopback
    except ValueError:
        return True


class StandinApp:
    """The ASGI callable: routing, middleware, recording, introspection."""

    def __init__(self, settings: StandinSettings) -> None:
        self.state: Final = ServerState(settings)
        self._introspection: Final = Introspection(self.state)
        self._router: Final = Router()
        for api in (NativeApi(self.state), MutationApi(self.state), OpenAIApi(self.state)):
            for method, pattern, handler in api.routes():
                self._router.add(method, pattern, handler)

    async def __call__(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1000})

    async def _lifespan(self, receive: ASGIReceive, send: ASGISend) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: ASGIScope, receive: ASGIReceive, send: ASGISend) -> None:
        received_ns = time.monotonic_ns()
        body, gone = await read_body(receive)
        method: str = scope["method"]
        path: str = scope["path"]
        if path.startswith(PREFIX) and self._introspection.handles(path):
            await self._introspection.answer(method=method, path=path, body=body, send=send)
            return
        record = RequestRecord.build(
            method=method,
            raw_path=scope.get("raw_path") or path.encode(),
            path=path,
            query=scope.get("query_string", b""),
            raw_headers=scope["headers"],
            body=body,
            received_at=go_time(),
        )
        self.state.recorder.add(record)
        if gone:
            record.disconnected = True
            return
        exchange = Exchange(scope, receive, send, body=body, record=record, received_ns=received_ns)
        await self._dispatch(exchange, check_host=_checks_host(scope))

    async def _redirect(self, exchange: Exchange, status: int, location: str) -> None:
        # Go's http.Redirect: a small HTML body for GET, a content type for GET and HEAD.
        body = b""
        if exchange.method == "GET":
            text = _STATUS_TEXT[status]
            body = f'<a href="{location.translate(_HTML_ESCAPES)}">{text}</a>.\n\n'.encode()
        content_type = HTML_UTF8 if exchange.method in ("GET", "HEAD") else None
        headers = [(b"location", location.encode())]
        await exchange.respond(status, body, content_type=content_type, headers=headers)

    async def _dispatch(self, exchange: Exchange, *, check_host: bool) -> None:
        method, path = exchange.method, exchange.path
        if _BAD_ESCAPE.search(exchange.raw_path):
            # net/http answers this itself, before any handler, and closes the connection.
            headers = [(b"connection", b"close")]
            await exchange.respond(400, b"400 Bad Request", content_type=TEXT_UTF8, headers=headers)
            return
        if method != "CONNECT":
            cleaned = clean_path(path)
            if cleaned != path:
                location = escaped_path(cleaned)
                if exchange.query:
                    location += "?" + exchange.query
                await self._redirect(exchange, 301, location)
                return
        match = self._router.lookup(method, path)
        if match.kind == "redirect":
            status = 301 if method == "GET" else 307
            await self._redirect(exchange, status, redirect_target(exchange))
            return
        if match.kind == "not_allowed":
            # gin sets Allow before running the middleware, so even a 403 carries it.
            exchange.extra_headers.append((b"allow", ", ".join(match.allow).encode()))
        cors = cors_verdict(
            origin=exchange.header("origin"), host=exchange.header("host"), method=method
        )
        if cors.action == "forbid":
            await exchange.respond(403)
            return
        exchange.extra_headers.extend(cors.headers)
        if cors.action == "preflight":
            await exchange.respond(204)
            return
        if check_host:
            verdict = host_verdict(exchange.header("host"), method=method)
            if verdict != "pass":
                await exchange.respond(403 if verdict == "forbid" else 204)
                return
        if match.kind == "found":
            assert match.handler is not None
            await match.handler(exchange, match.params)
        elif match.kind == "not_allowed":
            await exchange.respond(405, b"405 method not allowed", content_type=TEXT)
        else:
            await exchange.respond(404, b"404 page not found", content_type=TEXT)


def create_app(env: Mapping[str, str] | None = None) -> StandinApp:
    """Granian's factory: settings from NZ_STANDIN_* in `env` (default: the process's)."""
    return StandinApp(StandinSettings.from_env(os.environ if env is None else env))

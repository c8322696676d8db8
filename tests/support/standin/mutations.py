"""Endpoints that change models (pull, push, create, copy, delete, blobs), and the rest.

The gateway must never let a client reach these; they exist so tests can prove that
(the request log would show it). They answer plausibly but change nothing: the model
list stays as configured. Routes Ollama has but the stand-in does not model (cloud
account, experimental, Responses/Anthropic/audio) answer 501 so a test notices.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any, Final

from tests.support.standin.exchange import JSON_UTF8, NDJSON, Exchange
from tests.support.standin.gojson import encode, go_quote
from tests.support.standin.models import canonical_name
from tests.support.standin.native import bind_native, native_error
from tests.support.standin.router import Handler
from tests.support.standin.schemas import (
    COPY_REQUEST,
    CREATE_REQUEST,
    DELETE_REQUEST,
    PULL_REQUEST,
    PUSH_REQUEST,
)
from tests.support.standin.state import ServerState

__all__ = ["UNMODELLED_ROUTES", "MutationApi", "unmodelled"]

_DIGEST: Final = re.compile(r"sha256[:-][0-9a-f]{64}")

#: Ollama routes outside the stand-in's model (method, pattern).
UNMODELLED_ROUTES: Final = (
    ("GET", "/api/status"),
    ("POST", "/api/me"),
    ("POST", "/api/signout"),
    ("DELETE", "/api/user/keys/:encodedKey"),
    ("GET", "/api/experimental/model-recommendations"),
    ("POST", "/api/experimental/web_search"),
    ("POST", "/api/experimental/web_fetch"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/audio/transcriptions"),
)


async def unmodelled(exchange: Exchange, params: Mapping[str, str]) -> None:
    """501: Ollama has this route, the stand-in does not imitate it."""
    await native_error(exchange, 501, "not modelled by the Ollama stand-in")


async def _progress(
    exchange: Exchange, steps: list[dict[str, Any]], *, stream: bool, error: str | None
) -> None:
    """Ollama's progress reply: NDJSON steps (error as the last line), or just the outcome."""
    if stream:
        lines = [encode(step) + b"\n" for step in steps]
        if error is not None:
            lines.append(encode({"error": error}) + b"\n")
        await exchange.start_stream(200, content_type=NDJSON)
        for line in lines[:-1]:
            await exchange.write(line)
        await exchange.end_stream(lines[-1])
    elif error is not None:
        await native_error(exchange, 500, error)
    else:
        await exchange.respond(200, encode(steps[-1]), content_type=JSON_UTF8)


class MutationApi:
    """Handlers for the model-changing endpoints (read-only fakes)."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._blobs: set[str] = set()

    def routes(self) -> list[tuple[str, str, Handler]]:
        """(method, pattern, handler) for the mutation endpoints and the unmodelled ones."""
        routes: list[tuple[str, str, Handler]] = [
            ("POST", "/api/pull", self.pull),
            ("POST", "/api/push", self.push),
            ("DELETE", "/api/delete", self.delete),
            ("POST", "/api/create", self.create),
            ("POST", "/api/blobs/:digest", self.create_blob),
            ("HEAD", "/api/blobs/:digest", self.head_blob),
            ("POST", "/api/copy", self.copy),
        ]
        routes.extend((method, pattern, unmodelled) for method, pattern in UNMODELLED_ROUTES)
        return routes

    async def pull(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """Pretend to download a model (only known models "exist" upstream)."""
        fields = await bind_native(exchange, PULL_REQUEST)
        if fields is None:
            return
        name = fields.get("model") or fields.get("name") or ""
        if canonical_name(name) is None:
            await native_error(exchange, 400, "invalid model name")
            return
        steps: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        card = self._state.catalogue.find(name)
        error = None if card else "pull model manifest: file does not exist"
        if card is not None:
            steps += [
                {
                    "status": f"pulling {card.digest[:12]}",
                    "digest": f"sha256:{card.digest}",
                    "total": card.size,
                    "completed": card.size,
                },
                {"status": "verifying sha256 digest"},
                {"status": "writing manifest"},
                {"status": "success"},
            ]
        await _progress(exchange, steps, stream=fields.get("stream") is not False, error=error)

    async def push(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """Pretend to upload a model."""
        fields = await bind_native(exchange, PUSH_REQUEST)
        if fields is None:
            return
        name = fields.get("model") or fields.get("name") or ""
        if canonical_name(name) is None:
            await native_error(exchange, 400, "invalid model name")
            return
        steps: list[dict[str, Any]] = [{"status": "retrieving manifest"}]
        card = self._state.catalogue.find(name)
        error = None if card else f"model '{name}' not found"
        if card is not None:
            steps += [{"status": "pushing manifest"}, {"status": "success"}]
        await _progress(exchange, steps, stream=fields.get("stream") is not False, error=error)

    async def create(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """Pretend to create a model (nothing is added to the list)."""
        fields = await bind_native(exchange, CREATE_REQUEST)
        if fields is None:
            return
        name = fields.get("model") or fields.get("name") or ""
        if canonical_name(name) is None:
            await native_error(exchange, 400, "invalid model name")
            return
        layer = hashlib.sha256(exchange.body).hexdigest()
        steps: list[dict[str, Any]] = [
            {"status": f"using existing layer sha256:{layer}"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        await _progress(exchange, steps, stream=fields.get("stream") is not False, error=None)

    async def copy(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """200 with an empty body when the source exists."""
        fields = await bind_native(exchange, COPY_REQUEST)
        if fields is None:
            return
        source, destination = fields.get("source") or "", fields.get("destination") or ""
        if canonical_name(source) is None:
            await native_error(exchange, 400, f"source {go_quote(source)} is invalid")
        elif canonical_name(destination) is None:
            await native_error(exchange, 400, f"destination {go_quote(destination)} is invalid")
        elif self._state.catalogue.find(source) is None:
            await native_error(exchange, 404, f"model {go_quote(source)} not found")
        else:
            await exchange.respond(200)

    async def delete(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """200 with an empty body when the model exists (it is not actually removed)."""
        fields = await bind_native(exchange, DELETE_REQUEST)
        if fields is None:
            return
        name = fields.get("model") or fields.get("name") or ""
        if canonical_name(name) is None:
            await native_error(exchange, 400, f"name {go_quote(name)} is invalid")
        elif self._state.catalogue.find(name) is None:
            await native_error(exchange, 404, f"model '{name}' not found")
        else:
            await exchange.respond(200)

    async def create_blob(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """Accept a blob whose body matches its digest: 201 (200 if already present)."""
        digest = params["digest"]
        if not _DIGEST.fullmatch(digest):
            await native_error(exchange, 400, "invalid digest format")
            return
        actual = "sha256:" + hashlib.sha256(exchange.body).hexdigest()
        if digest.replace("-", ":", 1) in self._blobs:
            await exchange.respond(200)
        elif actual != digest.replace("-", ":", 1):
            await native_error(
                exchange,
                400,
                f"digest mismatch, expected {go_quote(digest)}, got {go_quote(actual)}",
            )
        else:
            self._blobs.add(actual)
            await exchange.respond(201)

    async def head_blob(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """200 if a blob with this digest was uploaded, else 404."""
        digest = params["digest"]
        if not _DIGEST.fullmatch(digest):
            await native_error(exchange, 400, "invalid digest format")
        elif digest.replace("-", ":", 1) in self._blobs:
            await exchange.respond(200)
        else:
            await native_error(exchange, 404, f"blob {go_quote(digest)} not found")

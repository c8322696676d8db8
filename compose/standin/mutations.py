"""Endpoints that change models (pull, push, create, copy, delete, blobs), and the rest.

The gateway must never let a client reach these; they exist so tests can prove that
(the request log would show it). They answer plausibly but change nothing: the model
list stays as configured. Routes Ollama has but the stand-in does not model (cloud
account, experimental, Responses/Anthropic/audio) answer 501 so a test notices.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from compose.standin.exchange import JSON_UTF8, NDJSON, Exchange
from compose.standin.gojson import GoType, encode, go_quote
from compose.standin.models import canonical_name
from compose.standin.native import bind_native, native_error
from compose.standin.router import Handler
from compose.standin.schemas import (
    COPY_REQUEST,
    CREATE_REQUEST,
    DELETE_REQUEST,
    PULL_REQUEST,
    PUSH_REQUEST,
)
from compose.standin.state import ServerState

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


#: A progress reply's NDJSON lines, in order.
_Steps = list[dict[str, Any]]
#: The steps one model's pull/push/create goes through, and the error that ends it, if any.
_Outcome = tuple[_Steps, str | None]


def _statuses(*texts: str) -> _Steps:
    """Progress steps that carry only a status text."""
    return [{"status": text} for text in texts]


async def _progress(exchange: Exchange, steps: _Steps, *, stream: bool, error: str | None) -> None:
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


def _model_name(fields: Mapping[str, Any]) -> str:
    # `model`, or the deprecated `name` these requests still accept.
    name: str = fields.get("model") or fields.get("name") or ""
    return name


async def _model_progress(
    exchange: Exchange, gotype: GoType, outcome_for: Callable[[str], _Outcome]
) -> None:
    """Pull, push and create: bind, refuse an invalid name, then report `outcome_for(name)`."""
    fields = await bind_native(exchange, gotype)
    if fields is None:
        return
    name = _model_name(fields)
    if canonical_name(name) is None:
        await native_error(exchange, 400, "invalid model name")
        return
    steps, error = outcome_for(name)
    # Like inference, these stream unless `stream` is an explicit false.
    await _progress(exchange, steps, stream=fields.get("stream") is not False, error=error)


def _create_outcome(body: bytes) -> _Outcome:
    # The body's hash stands in for the layer a real create would find or write.
    layer = hashlib.sha256(body).hexdigest()
    return _statuses(f"using existing layer sha256:{layer}", "writing manifest", "success"), None


async def _blob_key(exchange: Exchange, digest: str) -> str | None:
    """`sha256:<hex>` for the path's digest (`-` or `:` separated); else answers 400."""
    if not _DIGEST.fullmatch(digest):
        await native_error(exchange, 400, "invalid digest format")
        return None
    return digest.replace("-", ":", 1)


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
        await _model_progress(exchange, PULL_REQUEST, self._pull_outcome)

    def _pull_outcome(self, name: str) -> _Outcome:
        steps = _statuses("pulling manifest")
        card = self._state.catalogue.find(name)
        if card is None:
            return steps, "pull model manifest: file does not exist"
        layer = {
            "status": f"pulling {card.digest[:12]}",
            "digest": f"sha256:{card.digest}",
            "total": card.size,
            "completed": card.size,
        }
        done = _statuses("verifying sha256 digest", "writing manifest", "success")
        return [*steps, layer, *done], None

    async def push(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """Pretend to upload a model."""
        await _model_progress(exchange, PUSH_REQUEST, self._push_outcome)

    def _push_outcome(self, name: str) -> _Outcome:
        steps = _statuses("retrieving manifest")
        if self._state.catalogue.find(name) is None:
            return steps, f"model '{name}' not found"
        return [*steps, *_statuses("pushing manifest", "success")], None

    async def create(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """Pretend to create a model (nothing is added to the list)."""
        await _model_progress(
            exchange, CREATE_REQUEST, lambda _name: _create_outcome(exchange.body)
        )

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
        name = _model_name(fields)
        if canonical_name(name) is None:
            await native_error(exchange, 400, f"name {go_quote(name)} is invalid")
        elif self._state.catalogue.find(name) is None:
            await native_error(exchange, 404, f"model '{name}' not found")
        else:
            await exchange.respond(200)

    async def create_blob(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """Accept a blob whose body matches its digest: 201 (200 if already present)."""
        digest = params["digest"]
        key = await _blob_key(exchange, digest)
        if key is None:
            return
        actual = "sha256:" + hashlib.sha256(exchange.body).hexdigest()
        if key in self._blobs:
            await exchange.respond(200)
        elif actual != key:
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
        key = await _blob_key(exchange, digest)
        if key is None:
            return
        if key in self._blobs:
            await exchange.respond(200)
        else:
            await native_error(exchange, 404, f"blob {go_quote(digest)} not found")

"""Ollama's own API: `/`, `/api/version|tags|show|ps`, generate, chat, embed, embeddings.

Replies follow `api/types.go`: field order, `omitempty` (zero counts are absent), times
in RFC 3339 with nanoseconds, durations in nanoseconds, `{"error": ...}` for errors.
Streams are NDJSON, one token per line; the final line has `done: true`, `done_reason`
and the counts.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any, Final

from compose.standin import gojson
from compose.standin.embedder import embed_inputs, parse_inputs
from compose.standin.exchange import JSON, JSON_UTF8, NDJSON, TEXT_UTF8, Exchange
from compose.standin.gojson import BindError, GoType, bind, encode, go_quote, go_time
from compose.standin.inference import (
    MIDSTREAM_ERROR,
    Generation,
    Job,
    Refusal,
    prepare_chat,
    prepare_generate,
)
from compose.standin.models import ModelCard, canonical_name
from compose.standin.playback import play
from compose.standin.router import Handler
from compose.standin.schemas import (
    CHAT_REQUEST,
    EMBED_REQUEST,
    EMBEDDING_REQUEST,
    GENERATE_REQUEST,
    SHOW_REQUEST,
)
from compose.standin.state import ServerState
from compose.standin.textgen import embedding
from compose.standin.tokenizer import tokenize

__all__ = ["OLLAMA_VERSION", "NativeApi", "model_details", "native_error"]

#: The version the stand-in claims (Ollama's current stable release).
OLLAMA_VERSION: Final = "0.32.15"

_VOCABULARY: Final = 128_256


async def native_error(exchange: Exchange, status: int, message: str) -> None:
    """gin's `c.JSON(status, gin.H{"error": message})`."""
    await exchange.respond(status, encode({"error": message}), content_type=JSON_UTF8)


async def bind_native(exchange: Exchange, gotype: GoType) -> dict[str, Any] | None:
    """Bind the body like Ollama's handlers; answers the 400 itself and returns None."""
    try:
        return bind(exchange.body, gotype)
    except BindError as exc:
        await native_error(exchange, 400, "missing request body" if exc.empty else str(exc))
        return None


def model_details(card: ModelCard) -> dict[str, Any]:
    """`api.ModelDetails` (no omitempty: every field is always there)."""
    return {
        "parent_model": "",
        "format": "gguf",
        "family": card.family,
        "families": [card.family],
        "parameter_size": card.parameter_size,
        "quantization_level": card.quantization_level,
    }


def _token_id(token: str) -> int:
    return zlib.crc32(token.encode("utf-8", "surrogatepass")) % _VOCABULARY


class _NativeRenderer:
    """NDJSON chunks and final objects for /api/generate (`response`) or /api/chat."""

    stream_content_type = NDJSON

    def __init__(self, job: Job, *, chat: bool) -> None:
        self._job = job
        self._chat = chat
        self._model = encode(job.requested)
        self._tokens = job.reply.encoded if job.reply is not None else ()
        if chat:
            self._open = b',"message":{"role":"assistant","content":'
            self._close = b'},"done":false}\n'
        else:
            self._open = b',"response":'
            self._close = b',"done":false}\n'

    def chunk(self, index: int) -> bytes:
        created = go_time().encode()
        return (
            b'{"model":'
            + self._model
            + b',"created_at":"'
            + created
            + b'"'
            + self._open
            + self._tokens[index]
            + self._close
        )

    def _final(self, text: str, generation: Generation) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self._job.requested, "created_at": go_time()}
        if self._chat:
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["response"] = text
        body["done"] = True
        body["done_reason"] = self._job.done_reason
        if not self._chat:
            body["context"] = self._context(generation.emitted)
        body.update(generation.metrics())
        return body

    def _context(self, emitted: int) -> list[int]:
        ids = list(self._job.context)
        ids.extend(_token_id(token) for token in tokenize(self._job.prompt_text))
        ids.extend(_token_id(token) for token in self._job.text_tokens[:emitted])
        return ids

    def stream_tail(self, generation: Generation) -> bytes:
        return encode(self._final("", generation)) + b"\n"

    def whole(self, generation: Generation) -> tuple[bytes, bytes]:
        return JSON_UTF8, encode(self._final("".join(self._job.text_tokens), generation))

    def midstream_error(self) -> bytes:
        return encode({"error": MIDSTREAM_ERROR}) + b"\n"

    def error(self, status: int, message: str, *, streaming: bool) -> tuple[bytes, bytes]:
        # Before the first chunk, streamResponse sets plain application/json itself.
        return (JSON if streaming else JSON_UTF8), encode({"error": message})

    def preload(self) -> tuple[bytes, bytes]:
        assert self._job.preload is not None
        body: dict[str, Any] = {"model": self._job.requested, "created_at": go_time()}
        if self._chat:
            body["message"] = {"role": "assistant", "content": ""}
        else:
            body["response"] = ""
        body["done"] = True
        body["done_reason"] = self._job.preload
        return JSON_UTF8, encode(body)


class NativeApi:
    """Handlers for Ollama's native read and inference endpoints."""

    def __init__(self, state: ServerState) -> None:
        self._state = state

    def routes(self) -> list[tuple[str, str, Handler]]:
        """(method, pattern, handler) in Ollama's registration order."""
        return [
            ("HEAD", "/", self.root),
            ("GET", "/", self.root),
            ("HEAD", "/api/version", self.version),
            ("GET", "/api/version", self.version),
            ("HEAD", "/api/tags", self.tags),
            ("GET", "/api/tags", self.tags),
            ("POST", "/api/show", self.show),
            ("GET", "/api/ps", self.ps),
            ("POST", "/api/generate", self.generate),
            ("POST", "/api/chat", self.chat),
            ("POST", "/api/embed", self.embed),
            ("POST", "/api/embeddings", self.embeddings),
        ]

    async def root(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """`Ollama is running`."""
        await exchange.respond(200, b"Ollama is running", content_type=TEXT_UTF8)

    async def version(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """`{"version": ...}`."""
        await exchange.respond(200, encode({"version": OLLAMA_VERSION}), content_type=JSON_UTF8)

    async def tags(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """The local models."""
        models = [
            {
                "name": card.name,
                "model": card.name,
                "modified_at": card.modified_at,
                "size": card.size,
                "digest": card.digest,
                "details": model_details(card),
            }
            for card in self._state.catalogue.cards
        ]
        await exchange.respond(200, encode({"models": models}), content_type=JSON_UTF8)

    async def ps(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """The models used recently enough to count as loaded."""
        models = [
            {
                "name": card.name,
                "model": card.name,
                "size": card.size,
                "digest": card.digest,
                "details": model_details(card),
                "expires_at": go_time(expiry),
                "size_vram": card.size,
                "context_length": min(card.context_length, 4096),
            }
            for card, expiry in self._state.loaded()
        ]
        await exchange.respond(200, encode({"models": models}), content_type=JSON_UTF8)

    async def show(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """Model information (license, template, details, model_info, capabilities)."""
        fields = await bind_native(exchange, SHOW_REQUEST)
        if fields is None:
            return
        requested = fields.get("model") or fields.get("name") or ""
        if not requested:
            await native_error(exchange, 400, "model is required")
            return
        card = self._state.catalogue.find(requested)
        if card is None:
            await native_error(exchange, 404, f"model '{requested}' not found")
            return
        await exchange.respond(200, encode(show_body(card)), content_type=JSON_UTF8)

    async def generate(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """Completion of a prompt, streamed by default."""
        fields = await bind_native(exchange, GENERATE_REQUEST)
        if fields is None:
            return
        job = prepare_generate(self._state, fields)
        if isinstance(job, Refusal):
            await native_error(exchange, job.status, job.message)
            return
        await play(exchange, self._state, job, _NativeRenderer(job, chat=False))

    async def chat(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """The next assistant message, streamed by default."""
        fields = await bind_native(exchange, CHAT_REQUEST)
        if fields is None:
            return
        turns = [
            (message.get("role") or "", message.get("content") or "")
            for message in (item or {} for item in fields.get("messages") or [])
        ]
        job = prepare_chat(self._state, fields, turns)
        if isinstance(job, Refusal):
            await native_error(exchange, job.status, job.message)
            return
        await play(exchange, self._state, job, _NativeRenderer(job, chat=True))

    async def embed(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """Embeddings for one input or a list (never streamed)."""
        fields = await bind_native(exchange, EMBED_REQUEST)
        if fields is None:
            return
        inputs = parse_inputs(fields.get("input"))
        if isinstance(inputs, Refusal):
            await native_error(exchange, inputs.status, inputs.message)
            return
        outcome = embed_inputs(self._state, fields, inputs, received_ns=exchange.received_ns)
        if isinstance(outcome, Refusal):
            await native_error(exchange, outcome.status, outcome.message)
            return
        body: dict[str, Any] = {"model": outcome.requested, "embeddings": list(outcome.vectors)}
        if outcome.vectors:
            body["total_duration"] = outcome.total_duration
            body["load_duration"] = outcome.load_duration
            if outcome.prompt_tokens:
                body["prompt_eval_count"] = outcome.prompt_tokens
        await exchange.respond(200, encode(body), content_type=JSON_UTF8)

    async def embeddings(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """The legacy single-prompt endpoint: `{"embedding": [...]}`, no usage."""
        fields = await bind_native(exchange, EMBEDDING_REQUEST)
        if fields is None:
            return
        requested: str = fields.get("model") or ""
        if canonical_name(requested) is None:
            await native_error(exchange, 400, "model is required")
            return
        card = self._state.catalogue.find(requested)
        if card is None:
            message = f"model {go_quote(requested)} not found, try pulling it first"
            await native_error(exchange, 404, message)
            return
        try:
            keep_alive = gojson.go_duration_seconds(fields.get("keep_alive"))
        except BindError as exc:
            await native_error(exchange, 400, str(exc))
            return
        self._state.touch(card, keep_alive_s=keep_alive)
        prompt: str = fields.get("prompt") or ""
        vector = embedding(card.name, prompt, dims=card.embedding_length) if prompt else ()
        await exchange.respond(200, encode({"embedding": list(vector)}), content_type=JSON_UTF8)


def show_body(card: ModelCard) -> dict[str, Any]:
    """`api.ShowResponse` for `card`."""
    arch = card.family
    body: dict[str, Any] = {
        "license": "Stand-in model for tests; no weights, no licence terms.",
        "modelfile": (
            '# Modelfile generated by "ollama show"\n'
            f"# To build a new Modelfile based on this, replace FROM with:\n# FROM {card.name}\n\n"
            f"FROM /models/blobs/sha256-{card.digest}\n"
        ),
    }
    if card.supports("completion"):
        body["parameters"] = 'stop                           "<|end|>"'
        body["template"] = "{{ range .Messages }}{{ .Role }}: {{ .Content }}\n{{ end }}assistant:"
    body["details"] = model_details(card)
    body["model_info"] = {
        "general.architecture": arch,
        "general.parameter_count": card.parameter_count,
        f"{arch}.context_length": card.context_length,
        f"{arch}.embedding_length": card.embedding_length,
    }
    body["capabilities"] = list(card.capabilities)
    body["modified_at"] = card.modified_at
    return body

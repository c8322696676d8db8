"""Ollama's OpenAI-compatible surface: `/v1/chat/completions`, `/v1/completions`,
`/v1/embeddings`, `/v1/models[/{model}]`.

Ollama implements it as middleware that rewrites the request into a native one and the
native reply into OpenAI's shape, and the observable details come from that design:
`stream` defaults to false; binding errors are answered by the middleware with gin's
`application/json; charset=utf-8`, while handler errors pass through the writer as
`application/json` with a trailing newline (json.Encoder); non-streamed bodies end in a
newline too. SSE events are `data: <json>\\n\\n`, closed by `data: [DONE]\\n\\n`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any, Final

from compose.standin.embedder import embed_inputs, parse_inputs
from compose.standin.exchange import JSON, JSON_UTF8, Exchange
from compose.standin.gojson import BindError, GoType, bind, encode
from compose.standin.inference import Job, Refusal, prepare_chat, prepare_generate
from compose.standin.models import namespace_of
from compose.standin.openai_render import ChatRenderer, CompletionRenderer, openai_error
from compose.standin.playback import play
from compose.standin.router import Handler
from compose.standin.schemas import (
    OPENAI_CHAT_REQUEST,
    OPENAI_COMPLETION_REQUEST,
    OPENAI_EMBED_REQUEST,
)
from compose.standin.state import ServerState
from compose.standin.textgen import embedding_base64
from compose.standin.tokenizer import ChatTurn

__all__ = ["OpenAIApi"]

_IMAGE_PREFIXES: Final = tuple(
    f"data:image/{kind};base64," for kind in ("jpeg", "jpg", "png", "webp")
)
_EFFORTS: Final = ("high", "medium", "low", "none")


async def _middleware_error(exchange: Exchange, message: str) -> None:
    # c.AbortWithStatusJSON(400, ...) in the middleware: gin's JSON, no newline.
    await exchange.respond(400, openai_error(400, message), content_type=JSON_UTF8)


async def _writer_error(exchange: Exchange, status: int, message: str) -> None:
    # A handler error rewritten by the OpenAI writer: json.Encoder adds a newline.
    await exchange.respond(status, openai_error(status, message) + b"\n", content_type=JSON)


def _go_type_name(value: Any) -> str:
    # `%T` of a value encoding/json decoded into `any`.
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "float64"
    if isinstance(value, str):
        return "string"
    return "[]interface {}" if isinstance(value, list) else "map[string]interface {}"


class _InvalidRequest(Exception):
    """A conversion error the middleware answers with 400."""


def _image_ok(url: str) -> None:
    if url.startswith(("http://", "https://")):
        raise _InvalidRequest(
            "image URLs are not currently supported, please use base64 encoded data instead"
        )
    if url.startswith("data:;base64,"):
        data = url.removeprefix("data:;base64,")
    else:
        prefix = next((p for p in _IMAGE_PREFIXES if url.startswith(p)), None)
        if prefix is None:
            raise _InvalidRequest("invalid image input")
        data = url.removeprefix(prefix)
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _InvalidRequest("invalid image input") from None


def _turns(messages: list[Any]) -> list[ChatTurn]:
    """FromChatRequest: text parts become one message each, images an empty one."""
    turns: list[ChatTurn] = []
    for message in messages:
        message = message or {}
        role: str = message.get("role") or ""
        content = message.get("content")
        if isinstance(content, str):
            turns.append((role, content))
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    raise _InvalidRequest("invalid message format")
                kind = part.get("type")
                if kind == "text" and isinstance(part.get("text"), str):
                    turns.append((role, part["text"]))
                elif kind == "image_url":
                    image = part.get("image_url")
                    url = image.get("url") if isinstance(image, dict) else image
                    if not isinstance(url, str):
                        raise _InvalidRequest("invalid message format")
                    _image_ok(url)
                    turns.append((role, ""))
                else:
                    raise _InvalidRequest("invalid message format")
        elif message.get("tool_calls") is not None:
            turns.append((role, ""))
        else:
            raise _InvalidRequest(f"invalid message content type: {_go_type_name(content)}")
    return turns


def _think(request: Mapping[str, Any]) -> Any:
    effort = (request.get("reasoning") or {}).get("effort") or request.get("reasoning_effort")
    if not effort:
        return None
    if effort not in _EFFORTS:
        raise _InvalidRequest(
            f'invalid reasoning value: \'{effort}\' (must be "high", "medium", "low", or "none")'
        )
    return False if effort == "none" else effort


def _format(request: Mapping[str, Any]) -> Any:
    response_format = request.get("response_format") or {}
    kind = str(response_format.get("type") or "").strip().lower()
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        return (response_format.get("json_schema") or {}).get("schema")
    return None


def _options(request: Mapping[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if request.get("max_tokens") is not None:
        options["num_predict"] = request["max_tokens"]
    return options


class OpenAIApi:
    """Handlers for the OpenAI-compatible endpoints."""

    def __init__(self, state: ServerState) -> None:
        self._state = state

    def routes(self) -> list[tuple[str, str, Handler]]:
        """(method, pattern, handler) in Ollama's registration order."""
        return [
            ("POST", "/v1/chat/completions", self.chat_completions),
            ("POST", "/v1/completions", self.completions),
            ("POST", "/v1/embeddings", self.embeddings),
            ("GET", "/v1/models", self.models),
            ("GET", "/v1/models/:model", self.model),
        ]

    async def _bind(self, exchange: Exchange, gotype: GoType) -> dict[str, Any] | None:
        try:
            return bind(exchange.body, gotype)
        except BindError as exc:
            await _middleware_error(exchange, str(exc))
            return None

    async def _answer(
        self,
        exchange: Exchange,
        request: Mapping[str, Any],
        job: Job | Refusal,
        renderer: type[ChatRenderer | CompletionRenderer],
    ) -> None:
        """Play a prepared job in OpenAI's shape; a refusal goes out through the writer."""
        if isinstance(job, Refusal):
            await _writer_error(exchange, job.status, job.message)
            return
        include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
        stream = bool(request.get("stream"))
        await play(
            exchange, self._state, job, renderer(job, stream=stream, include_usage=include_usage)
        )

    async def chat_completions(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """Chat, as a chat.completion object or an SSE stream of chunks."""
        request = await self._bind(exchange, OPENAI_CHAT_REQUEST)
        if request is None:
            return
        messages = request.get("messages") or []
        if not messages:
            await _middleware_error(exchange, "[] is too short - 'messages'")
            return
        try:
            turns = _turns(messages)
            think = _think(request)
        except _InvalidRequest as exc:
            await _middleware_error(exchange, str(exc))
            return
        fields = {
            "model": request.get("model") or "",
            "stream": bool(request.get("stream")),
            "options": _options(request),
            "format": _format(request),
            "tools": request.get("tools"),
            "think": think,
        }
        job = prepare_chat(self._state, fields, turns)
        await self._answer(exchange, request, job, ChatRenderer)

    async def completions(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """Legacy text completion, as an object or an SSE stream."""
        request = await self._bind(exchange, OPENAI_COMPLETION_REQUEST)
        if request is None:
            return
        stop = request.get("stop")
        if isinstance(stop, list):
            for item in stop:
                if not isinstance(item, str):
                    message = f"invalid type for 'stop' field: {_go_type_name(item)}"
                    await _middleware_error(exchange, message)
                    return
        fields = {
            "model": request.get("model") or "",
            "prompt": request.get("prompt") or "",
            "suffix": request.get("suffix") or "",
            "stream": bool(request.get("stream")),
            "options": _options(request),
        }
        job = prepare_generate(self._state, fields)
        await self._answer(exchange, request, job, CompletionRenderer)

    async def embeddings(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """Embeddings as an OpenAI list (floats, or base64 float32 if asked)."""
        request = await self._bind(exchange, OPENAI_EMBED_REQUEST)
        if request is None:
            return
        encoding: str = request.get("encoding_format") or ""
        if encoding and encoding.lower() not in ("float", "base64"):
            message = (
                f"Invalid value for 'encoding_format' = {encoding}. "
                "Supported values: ['float', 'base64']."
            )
            await _middleware_error(exchange, message)
            return
        value = request.get("input")
        if value == "":
            value = [""]
        if value is None or value == []:
            await _middleware_error(exchange, "invalid input")
            return
        inputs = parse_inputs(value)
        if isinstance(inputs, Refusal):
            await _writer_error(exchange, inputs.status, inputs.message)
            return
        fields = {"model": request.get("model") or "", "dimensions": request.get("dimensions")}
        outcome = embed_inputs(self._state, fields, inputs, received_ns=exchange.received_ns)
        if isinstance(outcome, Refusal):
            await _writer_error(exchange, outcome.status, outcome.message)
            return
        as_base64 = encoding.lower() == "base64"
        data = [
            {
                "object": "embedding",
                "embedding": embedding_base64(vector) if as_base64 else vector,
                "index": index,
            }
            for index, vector in enumerate(outcome.vectors)
        ]
        tokens = outcome.prompt_tokens
        body = {
            "object": "list",
            "data": data,
            "model": request.get("model") or "",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        await exchange.respond(200, encode(body) + b"\n", content_type=JSON)

    async def models(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """The local models as an OpenAI list (`data` is null when there are none)."""
        data = [
            {
                "id": card.name,
                "object": "model",
                "created": card.modified_unix,
                "owned_by": namespace_of(card.name),
            }
            for card in self._state.catalogue.cards
        ]
        body = encode({"object": "list", "data": data or None}) + b"\n"
        await exchange.respond(200, body, content_type=JSON)

    async def model(self, exchange: Exchange, params: Mapping[str, str]) -> None:
        """One model, named as requested; 404 in OpenAI's error shape if unknown."""
        requested = params["model"]
        card = self._state.catalogue.find(requested)
        if card is None:
            await _writer_error(exchange, 404, f"model '{requested}' not found")
            return
        body = {
            "id": requested,
            "object": "model",
            "created": card.modified_unix,
            "owned_by": namespace_of(requested),
        }
        await exchange.respond(200, encode(body) + b"\n", content_type=JSON)

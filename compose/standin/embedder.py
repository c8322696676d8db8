"""Ollama's EmbedHandler, shared by `/api/embed` and `/v1/embeddings`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from compose.standin.gojson import BindError, go_duration_seconds
from compose.standin.inference import Refusal, runner_options
from compose.standin.models import ModelCard, canonical_name
from compose.standin.state import ServerState
from compose.standin.textgen import embedding, truncated
from compose.standin.tokenizer import count_tokens

__all__ = ["Embedded", "embed_inputs", "parse_inputs"]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Embedded:
    """The vectors for a request's inputs, with what Ollama reports about them."""

    requested: str
    card: ModelCard
    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int
    total_duration: int
    load_duration: int


def parse_inputs(value: Any) -> list[str] | Refusal:
    """`input` as EmbedHandler reads it: a string (empty means none) or a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    return Refusal(400, "invalid input type")


def embed_inputs(
    state: ServerState, fields: Mapping[str, Any], inputs: list[str], *, received_ns: int
) -> Embedded | Refusal:
    """Embed `inputs` with the request's model, truncation and dimensions."""
    requested: str = fields.get("model") or ""
    card = state.catalogue.find(requested) if canonical_name(requested) else None
    if card is None:
        return Refusal(404, f"model '{requested}' not found")
    try:
        keep_alive = go_duration_seconds(fields.get("keep_alive"))
    except BindError as exc:
        return Refusal(400, str(exc))
    load_ns = time.monotonic_ns()
    truncate = fields.get("truncate") is not False
    dims = fields.get("dimensions") or 0
    vectors: list[tuple[float, ...]] = []
    tokens = 0
    for text in inputs:
        count = count_tokens(text)
        if count > card.context_length:
            if not truncate:
                return Refusal(400, "input exceeds maximum context length")
            count = card.context_length
        tokens += count
        vector = embedding(card.name, text, dims=card.embedding_length)
        vectors.append(truncated(vector, dims) if 0 < dims < len(vector) else vector)
    state.use(card, runner_options(fields.get("options")))
    state.touch(card, keep_alive_s=keep_alive)
    done_ns = time.monotonic_ns()
    return Embedded(
        requested=requested,
        card=card,
        vectors=tuple(vectors),
        prompt_tokens=tokens,
        total_duration=max(done_ns - received_ns, 1),
        load_duration=max(load_ns - received_ns, 1),
    )

"""Token usage of one request: exact from a captured body, else estimated, else reserved.

- **exact**: Caddy captured the (non-streamed) response, which carries Ollama's counts:
  `prompt_eval_count`/`eval_count` (native), `usage.prompt_tokens`/`completion_tokens`
  (OpenAI), `prompt_eval_count` (/api/embed), `usage.prompt_tokens` (/v1/embeddings).
  Requests that never reached Ollama (refused, blocked) and info endpoints are exactly 0.
- **estimated**: a streamed reply is not captured, but its size is logged. Ollama sends
  one chunk per token in a known envelope (`envelope.py`), so the number of chunks is
  size / (envelope + the model's bytes per token). The bytes per token, the prompt
  tokens per request byte and (for /api/generate) the `context` array's bytes per token
  are learnt per model from the exact observations (`Calibration`).
- **reserved**: the line cannot tell (a capture that is missing or unreadable): the
  request is charged what admission reserved for it, fail-closed.
"""

from __future__ import annotations

import enum
import functools
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs
import msgspec

from meterd.envelope import Envelope, envelope_for, go_json_len
from meterd.parse import Event
from policyd.shared.tables import CALIBRATION_SUMS

__all__ = [
    "EMBED_PATHS",
    "STREAMABLE_PATHS",
    "SUMS",
    "USAGE_PATHS",
    "Calibration",
    "CalibrationRow",
    "Measured",
    "Observation",
    "Source",
    "Usage",
    "measure",
    "model_key",
]

STREAMABLE_PATHS: Final = frozenset(
    {"/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions"}
)
EMBED_PATHS: Final = frozenset({"/api/embed", "/api/embeddings", "/v1/embeddings"})
#: Endpoints whose requests consume tokens (policyd reserves for exactly these).
USAGE_PATHS: Final = STREAMABLE_PATHS | EMBED_PATHS

#: Weight an old observation keeps per new one: about the last 200 observations count.
DECAY: Final = 0.995
#: Until a model has been observed: typical English in a JSON string, tokens per body byte.
PRIOR_BYTES_PER_TOKEN: Final = 4.0
PRIOR_PROMPT_TOKENS_PER_BYTE: Final = 0.2
PRIOR_CONTEXT_BYTES_PER_TOKEN: Final = 6.0
_MIN_WEIGHT: Final = 1e-9
_TAGGED: Final = re.compile(r":[^/]+$")


class Source(enum.StrEnum):
    """Where an audit row's token counts come from."""

    EXACT = "exact"
    ESTIMATED = "estimated"
    RESERVED = "reserved"


@attrs.frozen(kw_only=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    source: Source

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@attrs.frozen(kw_only=True)
class Observation:
    """What an exact body teaches the estimator about one model and endpoint."""

    model: str
    path: str
    prompt_bytes: int
    prompt_tokens: int
    content_bytes: int
    completion_tokens: int
    context_bytes: int = 0
    context_tokens: int = 0


@attrs.frozen(kw_only=True)
class Measured:
    usage: Usage
    observation: Observation | None = None


#: Sums kept per (model, path), in this order: the `meter_calibration` columns.
SUMS: Final = CALIBRATION_SUMS


@attrs.frozen(kw_only=True)
class CalibrationRow:
    """Exponentially weighted sums for one (model, path); stored in `meter_calibration`.

    Prompt tokens are fitted as a line over request-body bytes (a request has a fixed
    JSON overhead besides its text), hence the sums of squares and products.
    """

    model: str
    path: str
    weight: float = 0.0
    prompt_weight: float = 0.0
    prompt_bytes: float = 0.0
    prompt_tokens: float = 0.0
    prompt_bytes_sq: float = 0.0
    prompt_cross: float = 0.0
    content_bytes: float = 0.0
    completion_tokens: float = 0.0
    context_bytes: float = 0.0
    context_tokens: float = 0.0

    def learn(self, obs: Observation) -> CalibrationRow:
        """The sums after one more observation: each decays by DECAY, then adds its part."""
        x, y = float(obs.prompt_bytes), float(obs.prompt_tokens)
        has_prompt = 1.0 if x > 0 and y > 0 else 0.0
        # Spelled out (not a loop over SUMS): this runs twice per exact request.
        return CalibrationRow(
            model=self.model,
            path=self.path,
            weight=self.weight * DECAY + 1.0,
            prompt_weight=self.prompt_weight * DECAY + has_prompt,
            prompt_bytes=self.prompt_bytes * DECAY + x * has_prompt,
            prompt_tokens=self.prompt_tokens * DECAY + y * has_prompt,
            prompt_bytes_sq=self.prompt_bytes_sq * DECAY + x * x * has_prompt,
            prompt_cross=self.prompt_cross * DECAY + x * y * has_prompt,
            content_bytes=self.content_bytes * DECAY + float(obs.content_bytes),
            completion_tokens=self.completion_tokens * DECAY + float(obs.completion_tokens),
            context_bytes=self.context_bytes * DECAY + float(obs.context_bytes),
            context_tokens=self.context_tokens * DECAY + float(obs.context_tokens),
        )

    def prompt_tokens_for(self, size: int) -> float | None:
        """Fitted prompt tokens for a request body of `size` bytes; None without data."""
        n = self.prompt_weight
        if n < 1e-6 or self.prompt_bytes <= 0:
            return None
        mean_x, mean_y = self.prompt_bytes / n, self.prompt_tokens / n
        variance = self.prompt_bytes_sq / n - mean_x * mean_x
        if n >= 3 and variance > (0.05 * mean_x) ** 2:
            slope = (self.prompt_cross / n - mean_x * mean_y) / variance
            if slope > 0:
                return max(mean_y + slope * (size - mean_x), 0.0)
        return size * mean_y / mean_x


@functools.lru_cache(maxsize=1024)
def model_key(model: str | None) -> str:
    """Calibration key of a model name: folded like Ollama matches names, tag defaulted."""
    name = (model or "").strip().lower()
    if not name:
        return "?"
    return name if _TAGGED.search(name) else f"{name}:latest"


class Calibration:
    """Per-model figures learnt from exact observations; owned by the daemon's loop."""

    def __init__(self, rows: Iterable[CalibrationRow] = ()) -> None:
        self._rows: dict[tuple[str, str], CalibrationRow] = {(r.model, r.path): r for r in rows}

    def rows(self) -> Mapping[tuple[str, str], CalibrationRow]:
        return dict(self._rows)

    def replace(self, rows: Iterable[CalibrationRow]) -> None:
        """Take the stored figures (all nodes contribute to them)."""
        self._rows = {(r.model, r.path): r for r in rows}

    def learn(self, obs: Observation) -> CalibrationRow:
        key = (obs.model, obs.path)
        row = self._rows.get(key) or CalibrationRow(model=obs.model, path=obs.path)
        self._rows[key] = row = row.learn(obs)
        return row

    def _model_rows(self, model: str) -> list[CalibrationRow]:
        return [row for (m, _), row in self._rows.items() if m == model]

    def bytes_per_token(self, model: str) -> float:
        """Encoded reply bytes per completion token (any endpoint: same text, same model)."""
        rows = self._model_rows(model)
        tokens = sum(r.completion_tokens for r in rows)
        if tokens < 1:
            return PRIOR_BYTES_PER_TOKEN
        return max(sum(r.content_bytes for r in rows) / tokens, 0.5)

    def prompt_tokens(self, model: str, path: str, size: int) -> float:
        """Prompt tokens of a request body of `size` bytes, for this endpoint's shape."""
        row = self._rows.get((model, path))
        fitted = row.prompt_tokens_for(size) if row is not None else None
        if fitted is not None:
            return fitted
        # This endpoint not seen yet for the model: the model's average rate, else a prior.
        rows = self._model_rows(model)
        total_bytes = sum(r.prompt_bytes for r in rows)
        tokens = sum(r.prompt_tokens for r in rows)
        rate = tokens / total_bytes if total_bytes >= 1 else PRIOR_PROMPT_TOKENS_PER_BYTE
        return size * rate

    def context_bytes_per_token(self, model: str) -> float:
        row = self._rows.get((model, "/api/generate"))
        if row is None or row.context_tokens < 1:
            return PRIOR_CONTEXT_BYTES_PER_TOKEN
        return row.context_bytes / row.context_tokens


# --- exact counts --------------------------------------------------------------------------


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**40:
        return value
    return None


def _decode_body(body: str) -> dict[str, Any] | None:
    """The JSON object of a captured body; for NDJSON (a stream after all) its last line."""
    text = body.strip()
    for candidate in (text, text.rpartition("\n")[2]):
        try:
            data = msgspec.json.decode(candidate)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, ValueError):
            continue
        if isinstance(data, dict):
            return data
    return None


def _content(data: Mapping[str, Any]) -> str:
    """The reply text of a non-streamed body, for learning bytes per token."""
    if isinstance(data.get("response"), str):
        return str(data["response"])
    message = data.get("message")
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        return str(message["content"])
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        if isinstance(choice.get("text"), str):
            return str(choice["text"])
        inner = choice.get("message")
        if isinstance(inner, dict) and isinstance(inner.get("content"), str):
            return str(inner["content"])
    return ""


def exact_counts(body: str) -> tuple[int, int, dict[str, Any]] | None:
    """(prompt, completion, decoded body) from a captured body, or None if it has none."""
    data = _decode_body(body)
    if data is None:
        return None
    usage = data.get("usage")
    if isinstance(usage, dict):
        prompt = _count(usage.get("prompt_tokens"))
        completion = _count(usage.get("completion_tokens", 0))
        if prompt is not None and completion is not None:
            return prompt, completion, data
    if "error" in data:
        return 0, 0, data  # Ollama refused or failed before generating
    native = ("done" in data) or ("embeddings" in data) or ("prompt_eval_count" in data)
    if native:
        # Ollama omits zero counts (omitempty), so a missing count is a zero.
        prompt = _count(data.get("prompt_eval_count", 0))
        completion = _count(data.get("eval_count", 0))
        if prompt is not None and completion is not None:
            return prompt, completion, data
    return None


def _observation(
    event: Event, prompt: int, completion: int, data: Mapping[str, Any]
) -> Observation | None:
    if event.status != 200 or event.path not in USAGE_PATHS:
        return None
    content = _content(data)
    context = data.get("context")
    context_bytes = context_tokens = 0
    if event.path == "/api/generate" and isinstance(context, list) and context:
        context_bytes = len(msgspec.json.encode(context))
        context_tokens = prompt + completion
    return Observation(
        model=model_key(event.model),
        path=event.path,
        prompt_bytes=event.bytes_in if prompt > 0 else 0,
        prompt_tokens=prompt if event.bytes_in > 0 else 0,
        content_bytes=go_json_len(content) if completion > 0 and content else 0,
        completion_tokens=completion if content else 0,
        context_bytes=context_bytes,
        context_tokens=context_tokens if context_bytes else 0,
    )


# --- estimates -----------------------------------------------------------------------------


def estimate_prompt(event: Event, calibration: Calibration) -> int:
    """Prompt tokens from the request body's size, as learnt for the model and endpoint."""
    return max(
        round(calibration.prompt_tokens(model_key(event.model), event.path, event.bytes_in)), 0
    )


def estimate_completion(
    event: Event, calibration: Calibration, *, prompt_tokens: int, envelope: Envelope
) -> int:
    """Chunks in a streamed reply of `event.bytes_out` bytes: one per completion token."""
    model = model_key(event.model)
    per_token = envelope.per_chunk + calibration.bytes_per_token(model)
    fixed = envelope.fixed
    if event.bytes_out < fixed:
        # Shorter than a final chunk: the stream was cut (the client left) before its
        # end, and every byte sent belongs to a token chunk.
        return max(round(event.bytes_out / per_token), 0)
    if envelope.context:
        per_context = calibration.context_bytes_per_token(model)
        per_token += per_context
        fixed += per_context * prompt_tokens
    return max(round((event.bytes_out - fixed) / per_token), 0)


def _reserved(event: Event, calibration: Calibration) -> Usage:
    if event.reserved is None:
        return Usage(prompt_tokens=0, completion_tokens=0, source=Source.RESERVED)
    prompt = min(estimate_prompt(event, calibration), event.reserved)
    return Usage(
        prompt_tokens=prompt, completion_tokens=event.reserved - prompt, source=Source.RESERVED
    )


#: Status Caddy logs when the client went away before the response was written.
CLIENT_CLOSED: Final = 499
#: Completion tokens per second of generation charged for a non-streamed request whose
#: client left (Ollama stops generating then; nothing tells how far it got). Generous on
#: purpose, and never more than the reservation's output part.
ABORTED_TOKENS_PER_S: Final = 100.0


def _prompt_floor(event: Event, calibration: Calibration) -> int:
    """Prompt tokens of a request whose body reached Ollama: policyd's count if logged."""
    if event.prompt_tokens is not None:
        return event.prompt_tokens
    return estimate_prompt(event, calibration)


def _aborted(event: Event, calibration: Calibration, tokens_per_s: float) -> Usage:
    """A request whose client left before its response was written (status 499).

    Its body reached Ollama, which read the whole prompt: it pays policyd's count of it.
    A stream pays the chunks it was sent (none if cut before the first); a non-streamed
    request generated for as long as it ran, at `tokens_per_s`, within its reservation.
    """
    prompt = _prompt_floor(event, calibration)
    completion = 0
    if event.stream and event.bytes_out > 0 and event.path in STREAMABLE_PATHS:
        # Cut mid-stream: every chunk sent carried one token, and no final chunk came.
        envelope = envelope_for(event.path, event.model or "", with_usage=event.stream_usage)
        per_token = envelope.per_chunk + calibration.bytes_per_token(model_key(event.model))
        completion = max(round(event.bytes_out / per_token), 0)
    elif not event.stream:
        allowance = max((event.reserved or 0) - prompt, 0)
        completion = min(allowance, math.ceil(event.duration_ms / 1000 * tokens_per_s))
    return Usage(prompt_tokens=prompt, completion_tokens=completion, source=Source.ESTIMATED)


def measure(
    event: Event,
    calibration: Calibration,
    *,
    aborted_tokens_per_s: float = ABORTED_TOKENS_PER_S,
) -> Measured:
    """The usage to settle and audit for `event` (and what it teaches the calibration)."""
    if not event.admitted or event.path not in USAGE_PATHS:
        # Never reached Ollama (refused or blocked), or an info endpoint: nothing used.
        return Measured(usage=Usage(prompt_tokens=0, completion_tokens=0, source=Source.EXACT))
    if event.status == CLIENT_CLOSED and not event.truncated:
        return Measured(usage=_aborted(event, calibration, aborted_tokens_per_s))
    if event.resp_body is not None:
        counted = exact_counts(event.resp_body)
        if counted is None:
            return Measured(usage=_reserved(event, calibration))
        prompt, completion, data = counted
        return Measured(
            usage=Usage(prompt_tokens=prompt, completion_tokens=completion, source=Source.EXACT),
            observation=_observation(event, prompt, completion, data),
        )
    if event.truncated or event.path not in STREAMABLE_PATHS or event.stream is False:
        # A capture was due but is missing (cut line, legacy /api/embeddings has no counts).
        if event.path == "/api/embeddings" and not event.truncated and event.status == 200:
            prompt = estimate_prompt(event, calibration)
            usage = Usage(prompt_tokens=prompt, completion_tokens=0, source=Source.ESTIMATED)
            return Measured(usage=usage)
        return Measured(usage=_reserved(event, calibration))
    if event.status != 200:
        # Ollama answers errors before the first chunk, as one small JSON object.
        return Measured(usage=Usage(prompt_tokens=0, completion_tokens=0, source=Source.ESTIMATED))
    envelope = envelope_for(event.path, event.model or "", with_usage=event.stream_usage)
    prompt = estimate_prompt(event, calibration)
    completion = estimate_completion(event, calibration, prompt_tokens=prompt, envelope=envelope)
    return Measured(
        usage=Usage(prompt_tokens=prompt, completion_tokens=completion, source=Source.ESTIMATED)
    )

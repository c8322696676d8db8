"""Token usage of one request: exact from a captured body, else estimated, else reserved.

- **exact**: Caddy captured the (non-streamed) response, which carries Ollama's counts:
  `prompt_eval_count`/`eval_count` (native), `usage.prompt_tokens`/`completion_tokens`
  (OpenAI), `prompt_eval_count` (/api/embed), `usage.prompt_tokens` (/v1/embeddings).
  Requests that never reached Ollama (refused, blocked) and info endpoints are exactly 0.
- **estimated**: a streamed reply is not captured, but its size is logged. Ollama sends
  one chunk per token in a known envelope (`envelope.py`), so the number of chunks is
  size / (envelope + bytes per token). Prompt tokens are policyd's count (the grant's
  `prompt`) times a ratio. The ratio, the bytes per token and (for /api/generate) the
  `context` array's bytes per id are learnt per tenant from its own exact observations,
  on a bounded base (`calibration.py`).
- **reserved**: the line cannot tell (a capture that is missing or unreadable): the
  request is charged what admission reserved for it, fail-closed.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from typing import Any, Final

import attrs
import msgspec

from meterd.calibration import Calibration, CalibrationRow, Observation, model_key
from meterd.envelope import Envelope, envelope_for, whole_overhead
from meterd.parse import Event

__all__ = [
    "EMBED_PATHS",
    "STREAMABLE_PATHS",
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

#: Lines written before policyd counted prompts (no `prompt` in the grant): prompt
#: tokens per request byte, only so that such lines still settle after an upgrade.
LEGACY_PROMPT_TOKENS_PER_BYTE: Final = 0.2


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
class Measured:
    usage: Usage
    observation: Observation | None = None


# --- exact counts --------------------------------------------------------------------------


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**40:
        return value
    return None


#: The figures Caddy's log filter keeps of a reply (caddy/gateway.caddy), e.g.
#: `,"done":true,"prompt_eval_count":19,"eval_count":12,` or `,,,,"usage":{…}`.
_FIGURE: Final = re.compile(
    r'"(prompt_eval_count|eval_count|prompt_tokens|completion_tokens)": ?([0-9]{1,15})'
)
_CONTEXT: Final = re.compile(r'"context":(\[[x,]*\])')


def _reduced(text: str) -> dict[str, Any] | None:
    """The counts of a filtered reply, shaped as Ollama's reply would hold them."""
    found = {name: int(value) for name, value in _FIGURE.findall(text)}
    data: dict[str, Any] = {}
    if '"usage":' in text:
        data["usage"] = {k: v for k, v in found.items() if k.endswith("_tokens")}
    else:
        data.update(found)
    if text.startswith('"error"'):
        data["error"] = True
    if '"done":true' in text:
        data["done"] = True
    return data or None


def _decode_body(body: str) -> dict[str, Any] | None:
    """The counts of a captured body.

    Caddy's log filter reduces a captured reply to its usage figures (see `_reduced`).
    Lines written before the filter hold the whole reply (for NDJSON, a stream after
    all, its last line counts).
    """
    text = body.strip()
    if not text.startswith("{"):
        return _reduced(text)
    for candidate in (text, text.rpartition("\n")[2]):
        try:
            data = msgspec.json.decode(candidate)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, ValueError):
            continue
        if isinstance(data, dict):
            return data
    return None


def exact_counts(body: str) -> tuple[int, int, dict[str, Any]] | None:
    """(prompt, completion, decoded counts) of a captured body, or None if it has none."""
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
    native = any(k in data for k in ("done", "embeddings", "prompt_eval_count", "eval_count"))
    if native:
        # Ollama omits zero counts (omitempty), so a missing count is a zero.
        prompt = _count(data.get("prompt_eval_count", 0))
        completion = _count(data.get("eval_count", 0))
        if prompt is not None and completion is not None:
            return prompt, completion, data
    return None


def _context_size(data: Mapping[str, Any], logged: str | None) -> tuple[int, int]:
    """(bytes, ids) of /api/generate's `context`: masked by the log filter, or whole."""
    masked = _CONTEXT.search(logged) if logged else None
    if masked is not None:
        ids = masked[1]
        return len(ids), ids.count(",") + 1 if len(ids) > 2 else 0
    context = data.get("context")
    if isinstance(context, list) and context:
        return len(msgspec.json.encode(context)), len(context)
    return 0, 0


def _observation(
    event: Event, prompt: int, completion: int, data: Mapping[str, Any]
) -> Observation | None:
    """What an exact reply teaches this tenant's figures (None: nothing plausible)."""
    if event.status != 200 or event.path not in USAGE_PATHS or event.tenant_id is None:
        return None
    context_bytes = context_tokens = 0
    if event.path == "/api/generate":
        context_bytes, context_tokens = _context_size(data, event.resp_context)
    reply_bytes = 0.0
    if event.path in STREAMABLE_PATHS and completion > 0:
        overhead = whole_overhead(
            event.path, event.model or "", prompt=prompt, completion=completion
        )
        # `context` is inside the overhead as []; its ids are not reply text.
        reply_bytes = event.bytes_out - overhead - max(context_bytes - 2, 0)
    return Observation.build(
        tenant=str(event.tenant_id),
        model=model_key(event.model),
        path=event.path,
        counted=event.prompt_tokens,
        prompt_tokens=prompt,
        reply_bytes=reply_bytes,
        completion_tokens=completion,
        context_bytes=max(context_bytes - 2, 0),
        context_tokens=context_tokens,
    )


# --- estimates -----------------------------------------------------------------------------


def _tenant(event: Event) -> str:
    return str(event.tenant_id) if event.tenant_id is not None else "?"


def estimate_prompt(event: Event, calibration: Calibration) -> int:
    """Prompt tokens from policyd's count, at this tenant's ratio for the model and endpoint."""
    if event.prompt_tokens is None:
        # A line from before the grant carried the count (upgrades only).
        legacy = round(event.bytes_in * LEGACY_PROMPT_TOKENS_PER_BYTE)
        return min(legacy, event.reserved) if event.reserved is not None else legacy
    ratio = calibration.figure("prompt", _tenant(event), model_key(event.model), event.path)
    return max(round(event.prompt_tokens * ratio), 0)


def estimate_completion(
    event: Event, calibration: Calibration, *, prompt_tokens: int, envelope: Envelope
) -> int:
    """Chunks in a streamed reply of `event.bytes_out` bytes: one per completion token."""
    tenant, model = _tenant(event), model_key(event.model)
    per_token = envelope.per_chunk + calibration.figure("reply", tenant, model, event.path)
    fixed = envelope.fixed
    if event.bytes_out < fixed:
        # Shorter than a final chunk: the stream was cut (the client left) before its
        # end, and every byte sent belongs to a token chunk.
        return max(round(event.bytes_out / per_token), 0)
    if envelope.context:
        per_context = calibration.figure("context", tenant, model, event.path)
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
        reply = calibration.figure("reply", _tenant(event), model_key(event.model), event.path)
        per_token = envelope.per_chunk + reply
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
    if event.resp_body:
        counted = exact_counts(event.resp_body)
        if counted is None:
            if event.path == "/api/embeddings" and event.status == 200:
                return Measured(usage=_legacy_embeddings(event, calibration))
            return Measured(usage=_reserved(event, calibration))
        prompt, completion, data = counted
        return Measured(
            usage=Usage(prompt_tokens=prompt, completion_tokens=completion, source=Source.EXACT),
            observation=_observation(event, prompt, completion, data),
        )
    if event.truncated or event.path not in STREAMABLE_PATHS or event.stream is False:
        # A capture was due but is missing (cut line; legacy /api/embeddings has no counts
        # and the log filter leaves nothing of it).
        if event.path == "/api/embeddings" and not event.truncated and event.status == 200:
            return Measured(usage=_legacy_embeddings(event, calibration))
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


def _legacy_embeddings(event: Event, calibration: Calibration) -> Usage:
    prompt = estimate_prompt(event, calibration)
    return Usage(prompt_tokens=prompt, completion_tokens=0, source=Source.ESTIMATED)

"""The byte envelope of Ollama's streamed chunks, per endpoint, for a given model name.

A streamed reply is one chunk per generated token: NDJSON objects on the native API,
`data: {…}` server-sent events on the OpenAI-compatible one. Everything in a chunk but
the token text has a known size for a known model name, up to a digit or two (the
timestamp's trimmed nanoseconds, the `chatcmpl-<0-998>` id), which is averaged here.
The layouts follow Ollama's encoders (`api/types.go`, `openai/openai.go`): Go's
`json.Marshal`, compact, HTML-escaped.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Final

import attrs
import msgspec

__all__ = ["Envelope", "envelope_for", "go_json_len", "whole_overhead"]

# RFC 3339 with nanoseconds, trailing zeros trimmed by Go: 30 characters, one in ten
# loses a digit or more (expected loss 1/9 of a character).
_CREATED_AT: Final = "2026-01-01T00:00:00.123456789Z"
_CREATED_AT_SHORTFALL: Final = 1 / 9
# OpenAI chunk ids are `chatcmpl-<0-998>` (`cmpl-` for completions): on average 2.89
# digits, written here as 3.
_ID_SHORTFALL: Final = 3 - (10 * 1 + 90 * 2 + 899 * 3) / 999
# Durations in the final chunk are nanoseconds: assume ten digits each.
_DURATION: Final = 1_234_567_890
_UNIX: Final = 1_767_225_600
_CONTROL: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_HTML: Final = re.compile("[<>&\u2028\u2029]")
_SHORT_ESCAPES: Final = re.compile(r'["\\\n\r\t]')


def go_json_len(text: str) -> int:
    """Bytes of `text` inside a JSON string as Go writes it (no quotes).

    Go keeps UTF-8 as is, escapes `"`, `\\` and \\n \\r \\t with one backslash, other
    control characters and `<`, `>`, `&`, U+2028, U+2029 as six-byte `\\uXXXX`.
    """
    size = len(text.encode("utf-8", "replace"))
    size += len(_SHORT_ESCAPES.findall(text))
    size += 5 * len(_CONTROL.findall(text))
    html = _HTML.findall(text)
    return size + 6 * len(html) - sum(len(c.encode()) for c in html)


@attrs.frozen(kw_only=True)
class Envelope:
    """Bytes a streamed reply spends besides its token text."""

    #: Per token chunk, excluding the token's own text.
    per_chunk: float
    #: Once per reply: the final chunk(s) and end marker.
    fixed: float
    #: The final chunk carries `context` (token ids of prompt and reply): /api/generate.
    context: bool = False


def _json(value: Any) -> int:
    return len(msgspec.json.encode(value))


def _metrics(*, prompt: int = 100, completion: int = 100) -> dict[str, int]:
    return {
        "total_duration": _DURATION,
        "load_duration": _DURATION,
        "prompt_eval_count": prompt,
        "prompt_eval_duration": _DURATION,
        "eval_count": completion,
        "eval_duration": _DURATION,
    }


def _native(model: str, path: str) -> Envelope:
    head: dict[str, Any] = {"model": model, "created_at": _CREATED_AT}
    if path == "/api/chat":
        chunk = {**head, "message": {"role": "assistant", "content": ""}, "done": False}
        final = {
            **head,
            "message": {"role": "assistant", "content": ""},
            "done_reason": "stop",
            "done": True,
            **_metrics(),
        }
    else:
        chunk = {**head, "response": "", "done": False}
        # `context` is accounted separately (its length grows with the conversation).
        final = {
            **head,
            "response": "",
            "done": True,
            "done_reason": "stop",
            "context": [],
            **_metrics(),
        }
    newline = 1
    return Envelope(
        per_chunk=_json(chunk) + newline - _CREATED_AT_SHORTFALL,
        fixed=_json(final) + newline - _CREATED_AT_SHORTFALL,
        context=path == "/api/generate",
    )


def _sse(payload: dict[str, Any]) -> int:
    return len(b"data: ") + _json(payload) + len(b"\n\n")


_ZERO_USAGE: Final = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
_USAGE: Final = {"prompt_tokens": 100, "completion_tokens": 100, "total_tokens": 200}


def _openai(model: str, path: str, *, with_usage: bool) -> Envelope:
    """SSE events; `with_usage`: the client asked for `stream_options.include_usage`."""
    done = len(b"data: [DONE]\n\n")
    if path == "/v1/completions":
        head: dict[str, Any] = {"id": "cmpl-123", "object": "text_completion", "created": _UNIX}
        tail: dict[str, Any] = {"model": model, "system_fingerprint": "fp_ollama"}
        # With include_usage every completions event carries a zero usage.
        zero = {"usage": _ZERO_USAGE} if with_usage else {}

        def event(finish: str | None) -> dict[str, Any]:
            choice = {"text": "", "index": 0, "finish_reason": finish}
            return {**head, "choices": [choice], **tail, **zero}

        per_chunk = _sse(event(None))
        fixed = _sse(event("stop"))
        if with_usage:
            fixed += _sse({**head, "choices": [], **tail, "usage": _USAGE})
    else:
        head = {
            "id": "chatcmpl-123",
            "object": "chat.completion.chunk",
            "created": _UNIX,
            "model": model,
            "system_fingerprint": "fp_ollama",
        }

        def chunk(delta: dict[str, str], finish: str | None) -> dict[str, Any]:
            return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        per_chunk = _sse(chunk({"content": ""}, None))
        # Only the first delta names the role; the finish event has an empty delta.
        fixed = len(b'"role":"assistant",') + _sse(chunk({}, "stop"))
        if with_usage:
            fixed += _sse({**head, "choices": [], "usage": _USAGE})
    events_fixed = fixed - (2 if with_usage else 1) * _ID_SHORTFALL
    return Envelope(per_chunk=per_chunk - _ID_SHORTFALL, fixed=events_fixed + done)


@functools.lru_cache(maxsize=1024)
def envelope_for(path: str, model: str, *, with_usage: bool = False) -> Envelope:
    """The envelope of a streamed reply from `path` for a request naming `model`.

    Ollama echoes the model name as the client spelled it, which is what policyd logs.
    `with_usage`: an OpenAI client asked for usage in the stream (extra bytes per event).
    """
    if path.startswith("/v1/"):
        return _openai(model, path, with_usage=with_usage)
    return _native(model, path)


def _digits(value: int) -> int:
    return len(str(max(value, 0)))


@functools.lru_cache(maxsize=1024)
def _whole_overhead(path: str, model: str) -> float:
    if path == "/v1/chat/completions":
        message = {"role": "assistant", "content": ""}
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": "stop"}
        head: dict[str, Any] = {"id": "chatcmpl-123", "object": "chat.completion"}
    elif path == "/v1/completions":
        choice = {"text": "", "index": 0, "finish_reason": "stop"}
        head = {"id": "cmpl-123", "object": "text_completion"}
    else:
        # A non-streamed native reply is the final chunk with the whole text, no newline.
        return _native(model, path).fixed - 1
    body = {
        **head,
        "created": _UNIX,
        "model": model,
        "system_fingerprint": "fp_ollama",
        "choices": [choice],
        "usage": _USAGE,
    }
    return _json(body) + 1 - _ID_SHORTFALL  # json.Encoder's newline


def whole_overhead(path: str, model: str, *, prompt: int, completion: int) -> float:
    """Bytes of a non-streamed reply besides its text (and, on /api/generate, besides the
    ids inside `context`), for counts `prompt` and `completion`.

    The access log keeps no reply text, so the text's size, which teaches the bytes per
    token, is the logged size minus this.
    """
    # The templates above write every count with three digits (total: three too).
    adjust = _digits(prompt) + _digits(completion) - 6
    if path.startswith("/v1/"):
        adjust += _digits(prompt + completion) - 3
    return _whole_overhead(path, model) + adjust

"""Read a request body the way Ollama will, or refuse it.

Ollama decodes with Go's `encoding/json`: keys match struct fields case-insensitively
(with Unicode simple folding, so a long s, U+017F, matches `s`) and the last duplicate
wins.
Python's decoder keeps `model` and `MODEL` apart, so a body that Go would read
differently from us is refused instead of guessed at: exact duplicate keys anywhere,
and any top-level key that folds to a field we decide on without being spelled exactly
like it.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

import attrs

from policyd.authz.paths import EndpointKind
from policyd.authz.promptsize import prompt_tokens
from policyd.shared.contract import Surface

__all__ = [
    "MAX_OUTPUT_TOKENS",
    "BodyError",
    "BodyFacts",
    "CloudModelError",
    "go_fold",
    "is_cloud_model",
    "read_body",
]

#: Top-level request fields of Ollama's request structs (`api/types.go`) and its OpenAI
#: layer: a key that Go would fold onto one of them must be spelled exactly like it,
#: since policyd reads, counts or rewrites them.
_DECISION_FIELDS: Final = (
    "model",
    "name",
    "stream",
    "options",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "prompt",
    "messages",
    "input",
    "system",
    "suffix",
    "template",
    "context",
    "raw",
    "format",
    "keep_alive",
    "images",
    "tools",
    "think",
    "truncate",
    "shift",
    "response_format",
    "functions",
)
#: Fields of message and content-part objects Go folds the same way (native and OpenAI).
_MESSAGE_FIELDS: Final = (
    "role",
    "content",
    "thinking",
    "reasoning",
    "images",
    "tool_calls",
    "tool_name",
    "tool_call_id",
    "name",
    "text",
    "type",
    "image_url",
)
#: Largest output cap anyone may name: beyond it a number is a mistake or an attack
#: (it used to reach the admission script as a float and fail there as a store error).
MAX_OUTPUT_TOKENS: Final = 1_048_576
#: Numbers policyd reads (output caps, context ids) must fit Go's and Lua's integers.
_INT32: Final = 2**31 - 1


class BodyError(Exception):
    """The body cannot be admitted; the message is shown to the caller."""


class CloudModelError(BodyError):
    """The body names a cloud model, which this gateway never forwards."""

    def __init__(self, message: str, *, model: str) -> None:
        super().__init__(message)
        #: The name as the client wrote it, for the audit.
        self.model = model


@attrs.frozen(kw_only=True)
class BodyFacts:
    """What the decision needs to know about a request body."""

    model: str | None
    stream: bool
    #: The output cap the request names (`num_predict`, `max_tokens`, ...), if any.
    max_output_tokens: int | None
    #: Conservative estimate of prompt tokens, for reservations.
    prompt_tokens: int
    include_usage: bool = False
    #: The largest output cap named in any field, honoured by Ollama or not; checked
    #: against the key's maximum so a request is refused rather than silently clamped.
    requested_output: int | None = None
    #: The body as decoded, which the normaliser rewrites into what Ollama receives.
    fields: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)


def _simple_fold(ch: str) -> str:
    # Go's field matching compares upper(lower(r)) per rune; Python's str case maps can
    # expand (ß -> SS), so only single-character mappings are taken.
    lower = ch.lower()
    lower = lower if len(lower) == 1 else ch
    upper = lower.upper()
    return upper if len(upper) == 1 else lower


def go_fold(name: str) -> str:
    """Fold `name` as Go's JSON decoder does when matching a struct field."""
    return "".join(_simple_fold(ch) for ch in name)


_FOLDED_FIELDS: Final = {go_fold(f): f for f in _DECISION_FIELDS}


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Go decodes a repeated object key into the value it already holds (a repeated
    # `options` merges), Python replaces it: refused anywhere, not guessed at. The dict is
    # built in C and the pairs walked only when it came out shorter (long chats have
    # hundreds of objects).
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BodyError(f"duplicate key {key!r} in request body")
            seen.add(key)
    return result


def _refuse_constant(name: str) -> Any:
    raise BodyError(f"invalid JSON: {name} is not a number")


def _finite_float(text: str) -> float:
    # Python reads 1e999 as infinity, which it would then write as `Infinity`: not JSON.
    value = float(text)
    if not math.isfinite(value):
        raise BodyError(f"number out of range in request body: {text[:40]}")
    return value


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError("request body is not valid UTF-8") from None
    try:
        value = json.loads(
            text,
            object_pairs_hook=_refuse_duplicates,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
        )
    except json.JSONDecodeError as exc:
        raise BodyError(f"invalid JSON in request body: {exc.msg} at offset {exc.pos}") from None
    except ValueError:
        # An integer literal past Python's 4300-digit conversion limit.
        raise BodyError("number out of range in request body") from None
    except RecursionError:
        raise BodyError("request body is nested too deeply") from None
    if not isinstance(value, dict):
        raise BodyError("request body must be a JSON object")
    for key in value:
        # For ASCII, Go's simple folding is upper-casing; other keys take the full fold
        # (non-ASCII letters such as U+017F fold onto ASCII field names).
        canonical = _FOLDED_FIELDS.get(key.upper() if key.isascii() else go_fold(key))
        if canonical is not None and key != canonical:
            raise BodyError(f"ambiguous key {key!r} in request body; write it as {canonical!r}")
    return value


_FOLDED_MESSAGE_FIELDS: Final = {go_fold(f): f for f in _MESSAGE_FIELDS}
_EXACT_MESSAGE_FIELDS: Final = frozenset(_MESSAGE_FIELDS)


def _check_message_keys(item: dict[str, Any]) -> None:
    for key in item:
        if key in _EXACT_MESSAGE_FIELDS:
            continue
        canonical = _FOLDED_MESSAGE_FIELDS.get(key.upper() if key.isascii() else go_fold(key))
        if canonical is not None:
            raise BodyError(f"ambiguous key {key!r} in a message; write it as {canonical!r}")


def _check_messages(messages: Any) -> None:
    """Message and content-part keys Go would fold onto a field must be spelled exactly."""
    if messages is None:
        return
    if type(messages) is not list:
        raise BodyError("messages must be an array")
    for message in messages:
        if type(message) is not dict:
            raise BodyError("each message must be an object")
        _check_message_keys(message)
        content = message.get("content")
        if type(content) is list:
            for part in content:
                if type(part) is dict:
                    _check_message_keys(part)


def is_cloud_model(name: str) -> bool:
    """True for names Ollama would proxy to ollama.com under the server's own account."""
    folded = name.strip().lower()
    return folded.endswith((":cloud", "-cloud"))


def _optional_int(value: Any, field: str, *, minimum: int, maximum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BodyError(f"{field} must be an integer")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise BodyError(f"{field} must be an integer")
        value = int(value)
    if value < minimum:
        raise BodyError(f"{field} must be at least {minimum}")
    if value > maximum:
        raise BodyError(f"{field} is out of range: at most {maximum}")
    return int(value)


def _stream_flag(body: dict[str, Any], *, default: bool) -> bool:
    value = body.get("stream")
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BodyError("stream must be a boolean")
    return value


def _model(body: dict[str, Any], kind: EndpointKind) -> str:
    value = body.get("model")
    if kind is EndpointKind.SHOW and value in (None, ""):
        value = body.get("name")  # /api/show still accepts the deprecated `name`
    if value is None or value == "":
        raise BodyError("model is required")
    if not isinstance(value, str):
        raise BodyError("model must be a string")
    if not value.strip():
        raise BodyError("model is required")
    return value


def _native_output_cap(body: dict[str, Any]) -> int | None:
    options = body.get("options")
    if options is None:
        return None
    if not isinstance(options, dict):
        raise BodyError("options must be an object")
    cap = _optional_int(
        options.get("num_predict"),
        "options.num_predict",
        minimum=-_INT32,
        maximum=_INT32,
    )
    # 0 and negatives name no cap: Ollama bounds any negative by ten context windows and
    # 0 by nothing (`llm/llama_server.go`, boundedNumPredict); the key's cap goes in.
    return cap if cap is not None and cap > 0 else None


def _openai_output_caps(body: dict[str, Any]) -> tuple[int | None, int | None]:
    """(cap Ollama enforces, largest cap named). Ollama maps only `max_tokens`."""
    enforced = _optional_int(body.get("max_tokens"), "max_tokens", minimum=1, maximum=_INT32)
    other = _optional_int(
        body.get("max_completion_tokens"), "max_completion_tokens", minimum=1, maximum=_INT32
    )
    named = [c for c in (enforced, other) if c is not None]
    return enforced, max(named) if named else None


def _check_context(body: dict[str, Any]) -> None:
    context = body.get("context")
    if context is None:
        return
    if type(context) is not list:
        raise BodyError("context must be an array of token ids")
    for item in context:
        if type(item) is not int or not 0 <= item < _INT32:
            raise BodyError("context must be an array of token ids")


def _require_input(body: dict[str, Any], surface: Surface, kind: EndpointKind) -> None:
    """Refuse a request that gives the model nothing to process.

    Without input Ollama only loads the model (or unloads it, with `keep_alive: 0`) and
    answers `done_reason: load`: an act on the shared server, not inference.
    """
    if kind is EndpointKind.EMBED:
        value = body.get("input", body.get("prompt"))
    elif "messages" in body or (surface is Surface.OPENAI and "prompt" not in body):
        value = body.get("messages")
    else:
        value = body.get("prompt")
    if value is None or value == "" or value == []:
        raise BodyError(
            "the request has no prompt, messages or input; requests that only load or "
            "unload a model are not accepted on this gateway"
        )


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise BodyError("stream_options must be an object")
    flag = options.get("include_usage", False)
    if flag is None:
        return False
    if not isinstance(flag, bool):
        raise BodyError("stream_options.include_usage must be a boolean")
    return flag


def read_body(
    raw: bytes, *, surface: Surface, kind: EndpointKind, image_tokens: int = 0
) -> BodyFacts:
    """Extract the facts policy needs from a POST body, refusing what Go would read otherwise.

    `image_tokens` is what one image costs in the prompt estimate (`NZ_IMAGE_TOKENS`).
    """
    if not raw.strip():
        raise BodyError("missing request body")
    body = _decode(raw)
    model = _model(body, kind)
    if is_cloud_model(model):
        raise CloudModelError(
            f"cloud models are not available through this gateway: {model!r}", model=model
        )
    if kind is EndpointKind.SHOW:
        return BodyFacts(
            model=model, stream=False, max_output_tokens=None, prompt_tokens=0, fields=body
        )
    _check_messages(body.get("messages"))
    _check_context(body)
    if kind is EndpointKind.EMBED:
        _require_input(body, surface, kind)
        tokens = prompt_tokens(body, image_tokens=image_tokens, templated=False)
        return BodyFacts(
            model=model, stream=False, max_output_tokens=0, prompt_tokens=tokens, fields=body
        )
    if surface is Surface.OLLAMA:
        stream = _stream_flag(body, default=True)
        cap = requested = _native_output_cap(body)
        include_usage = False
    else:
        # The OpenAI layer ignores `options`; a cap there would mislead the reservation.
        stream = _stream_flag(body, default=False)
        cap, requested = _openai_output_caps(body)
        include_usage = _include_usage(body)
    _require_input(body, surface, kind)
    return BodyFacts(
        model=model,
        stream=stream,
        max_output_tokens=cap,
        prompt_tokens=prompt_tokens(body, image_tokens=image_tokens),
        include_usage=include_usage,
        requested_output=requested,
        fields=body,
    )

"""The body Ollama receives: what policyd parsed, with the operator's policy written in.

Caddy replaces the upstream body with the one policyd answers in `H_UPSTREAM_BODY`
(`request_body set` after forward_auth), so every admitted body is re-serialised from
policyd's own parse: Ollama never reads bytes policyd read differently (no parser
differential can exist), and what policy decides is in the body, not only checked:

- the output cap: a request naming none (absent, 0, -1, -2; no `max_tokens`) gets the
  key's cap, so the reservation is exactly the cap Ollama enforces;
- the runtime options that act on the shared server belong to the operator: options that
  change how a model is loaded are removed (Ollama reloads a runner whose options differ,
  `server/sched.go: needsReload`), `num_ctx` and `keep_alive` follow the key's policy.

The JSON is written compact and ASCII-only (`\\u00e9`): a header value carries it, and
Caddy passes such a body byte for byte (`caddy-facts.md` §8).
"""

from __future__ import annotations

import json
import json.encoder
import math
import re
from collections.abc import Callable
from typing import Any, Final

import attrs
import msgspec

from policyd.authz.body import BodyError, BodyFacts
from policyd.authz.paths import EndpointKind
from policyd.shared.contract import Surface

__all__ = [
    "MAX_UPSTREAM_BODY",
    "RUNNER_OPTIONS",
    "Normalised",
    "RuntimePolicy",
    "keep_alive_seconds",
    "normalise",
    "serialise",
]

#: Options that decide how a model is loaded (`api/types.go` Runner, current and past):
#: one tenant's value would reload the runner every other tenant shares.
RUNNER_OPTIONS: Final = frozenset(
    {
        "num_gpu",
        "main_gpu",
        "num_batch",
        "num_thread",
        "use_mmap",
        "use_mlock",
        "numa",
        "low_vram",
        "f16_kv",
        "vocab_only",
        "logits_all",
        "num_gqa",
        "rope_frequency_base",
        "rope_frequency_scale",
        "embedding_only",
    }
)
#: Largest body Caddy was shown to carry in a header and set upstream (9 MB).
MAX_UPSTREAM_BODY: Final = 9_000_000

_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


@attrs.frozen(kw_only=True)
class RuntimePolicy:
    """What the operator allows one key to choose about the shared server."""

    #: Output tokens written in when the request names no cap.
    output_cap: int
    #: Longest `keep_alive` a client may ask for, in seconds; None = the client's
    #: `keep_alive` is removed and the server's default applies.
    max_keep_alive_s: int | None = None
    #: Largest `num_ctx` a client may ask for; None = the client's is removed.
    max_num_ctx: int | None = None


@attrs.frozen
class Normalised:
    """The body for Ollama and the output cap it carries (0 when it makes no output)."""

    body: str
    output_tokens: int


def _parse_duration(text: str) -> float:
    """Seconds of a Go duration string (`time.ParseDuration`): "5m", "1h30m", "-1s", "0"."""
    rest = text
    sign = 1.0
    if rest[:1] in ("-", "+"):
        sign = -1.0 if rest[0] == "-" else 1.0
        rest = rest[1:]
    if rest == "0":
        return 0.0
    total = 0.0
    position = 0
    while position < len(rest):
        match = _DURATION_PART.match(rest, position)
        if match is None:
            raise BodyError(f"keep_alive: invalid duration {text[:40]!r}")
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        position = match.end()
    if position == 0:
        raise BodyError(f"keep_alive: invalid duration {text[:40]!r}")
    return sign * total


def keep_alive_seconds(value: Any) -> float | None:
    """Ollama's reading of `keep_alive` (`api/types.go` Duration): a number is seconds,
    a string a Go duration, anything negative "forever" (inf); None when absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BodyError("keep_alive must be a number of seconds or a duration such as '5m'")
    seconds = _parse_duration(value) if isinstance(value, str) else float(value)
    return math.inf if seconds < 0 else seconds


def _keep_alive(value: Any, allowed: int | None) -> int | None:
    """The keep_alive to send: within (0, allowed], or None for the server's default."""
    seconds = keep_alive_seconds(value)
    if seconds is None or allowed is None or seconds == 0:
        # 0 would unload the model under every other tenant.
        return None
    return allowed if seconds > allowed else max(1, math.ceil(seconds))


def _num_ctx(value: Any, allowed: int | None) -> int | None:
    if value is None or allowed is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BodyError("options.num_ctx must be an integer")
    if value <= 0:
        return None
    return min(int(value), allowed)


def _runtime_options(options: Any, policy: RuntimePolicy) -> dict[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise BodyError("options must be an object")
    kept = {k: v for k, v in options.items() if k not in RUNNER_OPTIONS}
    num_ctx = _num_ctx(kept.pop("num_ctx", None), policy.max_num_ctx)
    if num_ctx is not None:
        kept["num_ctx"] = num_ctx
    return kept


def _output_tokens(facts: BodyFacts, policy: RuntimePolicy) -> int:
    # Over-cap requests were refused before: what is named here fits the key's cap.
    named = facts.max_output_tokens
    if named is None:
        named = facts.requested_output  # /v1: max_completion_tokens, which Ollama ignores
    return named if named is not None else policy.output_cap


def normalise(
    facts: BodyFacts, *, surface: Surface, kind: EndpointKind, policy: RuntimePolicy
) -> Normalised:
    """Rewrite the admitted body under `policy` and serialise it for Ollama."""
    body = dict(facts.fields)
    output = 0
    if kind is not EndpointKind.SHOW:
        if surface is Surface.OPENAI:
            # Ollama's OpenAI layer reads neither; dropped so no later version can.
            body.pop("options", None)
            body.pop("keep_alive", None)
        else:
            keep_alive = _keep_alive(body.pop("keep_alive", None), policy.max_keep_alive_s)
            if keep_alive is not None:
                body["keep_alive"] = keep_alive
            options = _runtime_options(body.pop("options", None), policy)
            if kind is EndpointKind.GENERATE:
                output = _output_tokens(facts, policy)
                options["num_predict"] = output
            if options:
                body["options"] = options
        if kind is EndpointKind.GENERATE and surface is Surface.OPENAI:
            output = _output_tokens(facts, policy)
            body.pop("max_completion_tokens", None)
            body["max_tokens"] = output
    return Normalised(serialise(body), output)


_ENCODER: Final = msgspec.json.Encoder()
#: The standard library's C string escaper: `"..."` with every non-ASCII code point as
#: `\\uXXXX` (surrogate pairs beyond the BMP), as `json.dumps(ensure_ascii=True)` writes.
_escape_ascii: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii
_SCALARS: Final = (int, float, bool, type(None))


class _NonAsciiKey(Exception):
    """A key msgspec would write as UTF-8 (keys cannot be pre-escaped): the rare body
    with one goes to the standard encoder."""


def _plain(item: Any) -> bool:
    return type(item) in _SCALARS or (type(item) is str and item.isascii())


def _escaped(value: Any) -> Any:
    """`value` with every non-ASCII string replaced by its escaped JSON text, which msgspec
    writes verbatim; ASCII strings, numbers and structure stay msgspec's to write."""
    kind = type(value)
    if kind is str:
        return value if value.isascii() else msgspec.Raw(_escape_ascii(value).encode("ascii"))
    if kind is dict:
        escaped = {}
        for key, item in value.items():
            if not key.isascii():
                raise _NonAsciiKey
            escaped[key] = item if _plain(item) else _escaped(item)
        return escaped
    if kind is list:
        return [item if _plain(item) else _escaped(item) for item in value]
    return value


def serialise(body: dict[str, Any]) -> str:
    """Compact, ASCII-only JSON of `body`.

    msgspec writes a 64 KiB conversation ~7x faster than the standard library, and its
    output is used as it is when ASCII already (nearly always). Otherwise only the strings
    that hold non-ASCII text are escaped, by the standard library's C escaper, and msgspec
    writes the rest: escaping is the whole cost of a body dense with non-ASCII text (the
    standard encoder does no better), and a mostly-ASCII one pays only for its non-ASCII
    strings. What msgspec cannot write (lone surrogates, integers beyond its range) and
    non-ASCII keys go to the standard encoder.
    """
    try:
        raw = _ENCODER.encode(body)
        if raw.isascii():
            return raw.decode("ascii")
        return _ENCODER.encode(_escaped(body)).decode("ascii")
    except (_NonAsciiKey, OverflowError, TypeError, ValueError, msgspec.EncodeError):
        return json.dumps(body, ensure_ascii=True, separators=(",", ":"))

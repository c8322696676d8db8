"""Which request-targets may go upstream: a canonical-form check, then an allowlist.

Ollama's router matches the *decoded*, cleaned path (`/api%2Fpull` reaches pull) while
Caddy forwards the raw request-target, so a path is allowed only if it is byte-for-byte
canonical. Nothing is normalised and then allowed.
"""

from __future__ import annotations

import enum
import re
from typing import Final
from urllib.parse import unquote

import attrs

from policyd.shared.contract import Surface

__all__ = [
    "MUTATION_PREFIXES",
    "Endpoint",
    "EndpointKind",
    "PathRefusal",
    "PathVerdict",
    "classify_target",
    "surface_of",
]


class EndpointKind(enum.StrEnum):
    """What a request to the endpoint carries, which decides how its body is read."""

    INFO = "info"  # no body, no model
    SHOW = "show"  # body names a model, no tokens
    GENERATE = "generate"  # produces tokens; may stream
    EMBED = "embed"  # consumes tokens; never streams


@attrs.frozen
class Endpoint:
    """One allowlisted endpoint."""

    path: str
    methods: frozenset[str]
    surface: Surface
    kind: EndpointKind
    #: For `/v1/models/{model}`: the model named in the path.
    path_model: str | None = None


class PathRefusal(enum.StrEnum):
    """Why a request-target was refused; mapped to a status in one place (routes)."""

    MUTATION = "mutation"
    NON_CANONICAL = "non_canonical"
    UNKNOWN = "unknown"
    METHOD = "method"


@attrs.frozen
class PathVerdict:
    """The endpoint, or the refusal with the methods the path would allow."""

    endpoint: Endpoint | None
    refusal: PathRefusal | None = None
    allowed_methods: frozenset[str] = frozenset()


_GET: Final = frozenset({"GET", "HEAD"})
_GET_ONLY: Final = frozenset({"GET"})
_POST: Final = frozenset({"POST"})
_OLLAMA: Final = Surface.OLLAMA
_OPENAI: Final = Surface.OPENAI

_ALLOWLIST: Final = {
    e.path: e
    for e in (
        Endpoint("/api/version", _GET, _OLLAMA, EndpointKind.INFO),
        Endpoint("/api/tags", _GET, _OLLAMA, EndpointKind.INFO),
        Endpoint("/api/ps", _GET_ONLY, _OLLAMA, EndpointKind.INFO),
        Endpoint("/api/show", _POST, _OLLAMA, EndpointKind.SHOW),
        Endpoint("/api/generate", _POST, _OLLAMA, EndpointKind.GENERATE),
        Endpoint("/api/chat", _POST, _OLLAMA, EndpointKind.GENERATE),
        Endpoint("/api/embed", _POST, _OLLAMA, EndpointKind.EMBED),
        Endpoint("/api/embeddings", _POST, _OLLAMA, EndpointKind.EMBED),
        Endpoint("/v1/chat/completions", _POST, _OPENAI, EndpointKind.GENERATE),
        Endpoint("/v1/completions", _POST, _OPENAI, EndpointKind.GENERATE),
        Endpoint("/v1/embeddings", _POST, _OPENAI, EndpointKind.EMBED),
        Endpoint("/v1/models", _GET_ONLY, _OPENAI, EndpointKind.INFO),
    )
}
_MODEL_PATH: Final = "/v1/models/"

#: Model-management endpoints: refused always, whatever the configuration.
MUTATION_PREFIXES: Final = (
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/copy",
    "/api/delete",
    "/api/blobs",
)

# Unreserved characters plus the sub-delims and ':' / '@' that RFC 3986 allows in a
# segment, minus ';' (a parameter separator to some routers). No '%', no '\'.
_CANONICAL_PATH: Final = re.compile(r"^(?:/[A-Za-z0-9\-._~!$&'()*+,=:@]+)+$|^/$")
# In the model segment only, percent-escapes that cannot change routing are accepted
# (clients escape ':' in `llama3.2:latest`); anything decoding to '/', '.', '\', '%',
# control characters or non-ASCII is not.
_MODEL_SEGMENT: Final = re.compile(r"^(?:[A-Za-z0-9\-._~!$&'()*+,=:@]|%3[Aa]|%40|%2[Bb])+$")


def surface_of(target: str) -> Surface:
    """The API a request-target belongs to, for choosing the error format (even if refused)."""
    stripped = target.lstrip("/\\").lower()
    return _OPENAI if stripped == "v1" or stripped.startswith(("v1/", "v1?")) else _OLLAMA


def _is_mutation(path: str) -> bool:
    """True for the mutation endpoints, also when spelled with another case or a slash."""
    folded = unquote(path).lower().replace("\\", "/")
    while "//" in folded:
        folded = folded.replace("//", "/")
    return any(folded == p or folded.startswith(p + "/") for p in MUTATION_PREFIXES)


def _segments_clean(path: str) -> bool:
    return all(seg not in {".", ".."} for seg in path.split("/")[1:])


#: Verdicts for the allowlisted paths spelled exactly, with an allowed method: nearly
#: every request. Those spellings are canonical and no mutation, so the checks below
#: would pass them anyway; the lookup skips the unquoting and the regular expressions.
_EXACT: Final = {
    (method, e.path): PathVerdict(e) for e in _ALLOWLIST.values() for method in e.methods
}


def classify_target(method: str, target: str) -> PathVerdict:
    """Decide whether `method target` (the raw request-target) may reach Ollama."""
    path = target.split("?", 1)[0]
    exact = _EXACT.get((method, path))
    if exact is not None:
        return exact
    if _is_mutation(path):
        return PathVerdict(None, PathRefusal.MUTATION)
    if path.startswith(_MODEL_PATH):
        segment = path[len(_MODEL_PATH) :]
        if not _MODEL_SEGMENT.fullmatch(segment) or segment in {".", ".."}:
            return PathVerdict(None, PathRefusal.NON_CANONICAL)
        endpoint = Endpoint(
            "/v1/models/{model}", _GET_ONLY, _OPENAI, EndpointKind.INFO, unquote(segment)
        )
    else:
        if not _CANONICAL_PATH.fullmatch(path) or not _segments_clean(path):
            return PathVerdict(None, PathRefusal.NON_CANONICAL)
        found = _ALLOWLIST.get(path)
        if found is None:
            return PathVerdict(None, PathRefusal.UNKNOWN)
        endpoint = found
    if method not in endpoint.methods:
        return PathVerdict(None, PathRefusal.METHOD, endpoint.methods)
    return PathVerdict(endpoint)

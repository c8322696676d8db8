"""One access-log line (bytes) to an `Event`, or a `BadLine` saying why not. Pure.

Caddy writes the lines, but parts of them come from clients (URI, User-Agent, bodies),
and a damaged file can hold anything. So every value that reaches a typed column is
checked and bounded here: a hostile value either becomes NULL or rejects the line, and
never makes a Postgres transaction fail (which would stall settlement for good). Texts
lose NUL characters and lone surrogates, which Postgres cannot store.

Field names are the contract with `caddy/gateway.caddy`: Caddy's own (`uuid`, `ts`,
`request`, `status`, `size`, `bytes_read`, `duration`, `resp_headers`), policyd's grant
(`nz_grant`, `policyd.shared.contract.Grant`), or on a refusal who was refused
(`nz_refused`, `contract.Refused`), `resp_body` and `resp_context` (the usage figures
Caddy's log filter keeps of a captured reply), and the optional `req_body` (prompt
logging) and `ttfb_ms` (`{http.reverse_proxy.upstream.latency_ms}`).
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import json
import math
import re
import uuid
from typing import Any, Final

import attrs
import msgspec

from policyd.shared.contract import (
    H_REFUSAL,
    LOG_GRANT,
    LOG_REFUSED,
    LOG_UPSTREAM,
    Surface,
    parse_grant,
)

__all__ = ["PROBE_PATHS", "BadLine", "Event", "parse_line"]

#: Load-balancer probes that Caddy answers without a key; they are not audited.
PROBE_PATHS: Final = frozenset({"/healthz", "/readyz"})

_MAX_PATH: Final = 2048
_MAX_USER_AGENT: Final = 256
_MAX_MODEL: Final = 256
_MAX_INT: Final = 2**62
_MAX_DURATION_S: Final = 10.0**7
# Sane wall-clock range for `ts`: anything else is a damaged line, not a request.
_MIN_TS: Final = 946_684_800.0  # 2000-01-01
_MAX_TS: Final = 7_258_118_400.0  # 2200-01-01
# Key and tenant ids and client addresses repeat from line to line: parsed once each.
_CACHED: Final = 4096
_METHOD: Final = re.compile(r"^[A-Z]{1,16}$")
_PREFIX: Final = re.compile(r"^nz_[a-z0-9]{1,32}$")
_REFUSAL: Final = re.compile(r"^[a-z0-9_.-]{1,64}$")
_RESERVED: Final = re.compile(r"^[0-9]{1,18}$")
# Caddy's {http.reverse_proxy.upstream.hostport}: host:port, IPv6 in brackets.
_UPSTREAM: Final = re.compile(r"^[A-Za-z0-9._\-\[\]:%]{1,255}$")
_SURFACES: Final = frozenset(s.value for s in Surface)
# Where a line cut to its head may be closed (see `_close_head`).
_RESP_BODY_FIELD: Final = b',"resp_body":"'
_REQ_BODY_FIELD: Final = b'"req_body":'
_DECODE_ERRORS: Final = (
    msgspec.DecodeError,
    msgspec.ValidationError,
    RecursionError,
    UnicodeDecodeError,
    ValueError,
)


@attrs.frozen(kw_only=True)
class BadLine:
    """A line that cannot be settled; `reason` is safe to log (it never quotes the line)."""

    reason: str


@attrs.frozen(kw_only=True)
class Event:
    """One request as Caddy logged it, checked and bounded."""

    request_id: uuid.UUID
    #: When the request started (Caddy's `ts` is when it ended), UTC.
    started: dt.datetime
    method: str
    #: The path without its query string (queries may carry secrets).
    path: str
    status: int
    bytes_in: int
    bytes_out: int
    duration_ms: int
    ttfb_ms: int | None = None
    client_ip: str | None = None
    user_agent: str | None = None
    #: The Ollama host that served the request (host:port), when one did.
    upstream: str | None = None
    #: policyd's refusal code, when policyd refused the request.
    refusal: str | None = None
    key_id: uuid.UUID | None = None
    key_prefix: str | None = None
    tenant_id: uuid.UUID | None = None
    surface: str | None = None
    model: str | None = None
    stream: bool | None = None
    prompt_log: bool = False
    #: An OpenAI stream with `stream_options.include_usage` (more bytes per event).
    stream_usage: bool = False
    reserved: int | None = None
    #: policyd's count of the prompt Ollama tokenises (the grant's `prompt`): what
    #: streamed prompts are estimated from, and the least an aborted request whose body
    #: reached Ollama pays.
    prompt_tokens: int | None = None
    #: The ids came with a grant, so policyd admitted the request and reserved for it.
    #: False: they name who a refusal was for (`nz_refused`); nothing was reserved.
    granted: bool = True
    #: A 401's key prefix as the client claimed it: never verified, never `key_prefix`.
    claimed_prefix: str | None = None
    resp_body: str | None = attrs.field(default=None, repr=False)
    #: /api/generate's `context` ids, each masked to its length (`"context":[xx,xxx]`).
    resp_context: str | None = attrs.field(default=None, repr=False)
    req_body: str | None = attrs.field(default=None, repr=False)
    #: The line was longer than the limit: its bodies are unknown.
    truncated: bool = False

    @property
    def admitted(self) -> bool:
        """policyd let it through (and so reserved for it): it carries key and tenant ids."""
        return self.granted and self.key_id is not None and self.tenant_id is not None

    @property
    def is_probe(self) -> bool:
        """A health probe: no key, a probe path."""
        return self.key_id is None and self.path in PROBE_PATHS


def clean_text(value: object, limit: int) -> str | None:
    """A string fit for a Postgres text column, at most `limit` characters; else None."""
    if not isinstance(value, str) or not value:
        return None
    text = value[:limit]
    if "\x00" in text:
        text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from \udxxx escapes
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text or None


def _int(value: object, *, low: int = 0, high: int = _MAX_INT) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and low <= value <= high:
        return value
    if isinstance(value, float) and math.isfinite(value) and low <= value <= high:
        return int(value)
    return None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _uuid(value: object) -> uuid.UUID | None:
    if not isinstance(value, str) or not 32 <= len(value) <= 36:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


@functools.lru_cache(maxsize=_CACHED)
def _known_uuid(value: str) -> uuid.UUID | None:
    return _uuid(value)


def _id(value: object) -> uuid.UUID | None:
    """`_uuid` for ids that recur (keys, tenants)."""
    return _known_uuid(value) if isinstance(value, str) else None


def _first_header(headers: object, name: str) -> object:
    """First value of header `name` in Caddy's `{"Name": ["v", ...]}` maps."""
    if not isinstance(headers, dict):
        return None
    values = headers.get(name)
    if isinstance(values, list) and values:
        return values[0]
    return None


def _ip(value: object) -> str | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    return _canonical_ip(value)


@functools.lru_cache(maxsize=_CACHED)
def _canonical_ip(value: str) -> str | None:
    if "%" in value:
        return None  # a zone id (fe80::1%eth0): Python takes it, Postgres' inet does not
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def _match(pattern: re.Pattern[str], value: object) -> str | None:
    if isinstance(value, str) and pattern.fullmatch(value):
        return value
    return None


def _flag(value: object) -> bool | None:
    return {"1": True, "0": False}.get(value) if isinstance(value, str) else None


def _grant(data: dict[str, Any]) -> dict[str, str]:
    """policyd's grant as name -> value (unchecked), from `nz_grant`."""
    value = data.get(LOG_GRANT)
    return parse_grant(value) if isinstance(value, str) and value else {}


def _ttfb(value: object) -> int | None:
    # Caddy logs `{…latency_ms}` as a float; a string form is accepted too.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    number = _number(value)
    if number is None or not 0 <= number <= _MAX_DURATION_S * 1000:
        return None
    return round(number)


def _close_head(head: bytes) -> bytes | None:
    """A cut line, closed before its response body so the rest still parses.

    Caddy appends `resp_body` after every other field (late log_append fields follow the
    early `req_body`), so a line too long to keep whole still has all the metadata in its
    head. Inside a JSON string every quote is escaped, so `,"resp_body":"` with bare
    quotes can only be the field itself.
    """
    cut = head.find(_RESP_BODY_FIELD)
    return head[:cut] + b"}" if cut > 0 else None


def parse_line(raw: bytes, *, truncated: bool = False) -> Event | BadLine:
    """Parse one line (without its newline). `truncated`: only the line's head was kept."""
    if truncated:
        closed = _close_head(raw)
        if closed is None:
            return BadLine(reason="line too long, cut before its response body")
        raw = closed
    if not raw.strip():
        return BadLine(reason="empty line")
    try:
        data: Any = msgspec.json.decode(raw)
    except _DECODE_ERRORS as exc:
        # msgspec refuses `\udxxx` escapes of lone surrogates; the standard library takes
        # them (and the texts are cleaned below), so such a line still settles.
        try:
            data = json.loads(raw)
        except (*_DECODE_ERRORS, json.JSONDecodeError):
            return BadLine(reason=f"not JSON ({type(exc).__name__})")
    if not isinstance(data, dict):
        return BadLine(reason="not a JSON object")
    if data.get("req_body") == "" and raw.count(_REQ_BODY_FIELD) > 1:
        data["req_body"] = _first_request_body(raw)
    return _event(data, truncated=truncated)


def _first_request_body(raw: bytes) -> object:
    """`req_body` as first written, when Caddy wrote the field twice.

    Without the `<` (early) prefix, `log_append req_body {http.request.body}` makes
    Caddy 2.11.7 log the body early *and* once more at the end, then empty (the body was
    consumed). JSON decoders keep the last duplicate; the first one is the prompt.
    """

    def first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for name, value in pairs:
            if name not in result or (name == "req_body" and not result[name]):
                result[name] = value
        return result

    try:
        data = json.loads(raw, object_pairs_hook=first_wins)
    except (*_DECODE_ERRORS, json.JSONDecodeError):
        return None
    return data.get("req_body") if isinstance(data, dict) else None


def _event(data: dict[str, Any], *, truncated: bool) -> Event | BadLine:
    request_id = _uuid(data.get("uuid"))
    if request_id is None:
        return BadLine(reason="no valid request id (uuid)")
    ended = _number(data.get("ts"))
    if ended is None or not _MIN_TS <= ended <= _MAX_TS:
        return BadLine(reason="no valid timestamp (ts)")
    status = _int(data.get("status"), high=999)
    if status is None:
        return BadLine(reason="no valid status")
    request = data.get("request")
    if not isinstance(request, dict):
        return BadLine(reason="no request object")
    uri = request.get("uri")
    if not isinstance(uri, str):
        return BadLine(reason="no request uri")
    duration = _number(data.get("duration"))
    duration = duration if duration is not None and 0 <= duration <= _MAX_DURATION_S else 0.0
    method = request.get("method")
    resp_headers = data.get("resp_headers")
    body = data.get("resp_body")
    prompt = data.get("req_body")
    grant = _grant(data)
    granted = bool(grant)
    if not granted:
        refused = data.get(LOG_REFUSED)
        grant = parse_grant(refused) if isinstance(refused, str) else {}
    return Event(
        request_id=request_id,
        started=dt.datetime.fromtimestamp(ended - duration, dt.UTC),
        method=method if isinstance(method, str) and _METHOD.match(method) else "?",
        path=clean_text(uri.partition("?")[0], _MAX_PATH) or "/",
        status=status,
        bytes_in=_int(data.get("bytes_read")) or 0,
        bytes_out=_int(data.get("size")) or 0,
        duration_ms=round(duration * 1000),
        ttfb_ms=_ttfb(data.get("ttfb_ms")),
        client_ip=_ip(request.get("client_ip")) or _ip(request.get("remote_ip")),
        user_agent=clean_text(
            data.get("user_agent") or _first_header(request.get("headers"), "User-Agent"),
            _MAX_USER_AGENT,
        ),
        refusal=_match(_REFUSAL, _first_header(resp_headers, H_REFUSAL)),
        upstream=_match(_UPSTREAM, data.get(LOG_UPSTREAM)),
        key_id=_id(grant.get("key")),
        key_prefix=_match(_PREFIX, grant.get("prefix")),
        tenant_id=_id(grant.get("tenant")),
        surface=grant.get("surface") if grant.get("surface") in _SURFACES else None,
        model=clean_text(grant.get("model"), _MAX_MODEL),
        stream=_flag(grant.get("stream")),
        # The flags are "log=<c|-><p|->"; only the prompt flag matters here.
        prompt_log=grant.get("log", "")[1:2] == "p",
        stream_usage=_flag(grant.get("usage")) is True,
        reserved=int(r) if (r := _match(_RESERVED, grant.get("reserved"))) else None,
        prompt_tokens=int(p) if (p := _match(_RESERVED, grant.get("prompt"))) else None,
        granted=granted,
        claimed_prefix=_match(_PREFIX, grant.get("claimed")),
        resp_body=body if isinstance(body, str) else None,
        resp_context=context if isinstance(context := data.get("resp_context"), str) else None,
        req_body=prompt if isinstance(prompt, str) and prompt else None,
        truncated=truncated,
    )

"""What policyd, Caddy and meterd must agree on.

This module is dependency-free on purpose: meterd imports it, and the Caddyfiles and
docs name the same headers and log fields. Change a name here and in `caddy/` together.
Redis key names live in `keyspace`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from importlib import resources
from typing import Final

__all__ = [
    "AUTHZ_KEY_PATH",
    "AUTHZ_PATH",
    "COPIED_HEADERS",
    "H_BODY",
    "H_CLIENT",
    "H_GRANT",
    "H_LISTING",
    "H_RATE_REQUESTS",
    "H_RATE_TOKENS",
    "H_REFUSAL",
    "H_REFUSED",
    "H_REQUEST_ID",
    "H_ROUTE",
    "H_UPSTREAM_BODY",
    "KEY_PREFIX_LEN",
    "KEY_SCHEME",
    "LOG_GRANT",
    "LOG_REFUSED",
    "LOG_UPSTREAM",
    "RATE_LIMIT_HEADERS",
    "Grant",
    "Refused",
    "Surface",
    "admit_script",
    "calendar_day",
    "calendar_month",
    "load_script",
    "parse_grant",
    "release_script",
    "settle_script",
]

#: Where Caddy's forward_auth asks policyd.
AUTHZ_PATH: Final = "/authz"
#: Where Caddy asks policyd about path and key alone, before it reads a body it has no
#: cheap bound for (no key-shaped token, or not a small declared length).
AUTHZ_KEY_PATH: Final = "/authz/key"

#: Request header Caddy fills with `{http.request.body_base64}` for policyd only.
H_BODY: Final = "X-Nz-Body"
#: Caddy's `{http.vars.client_ip}` (the remote address, or what trusted proxies say):
#: whose authentication failures are counted (authz/tarpit.py).
H_CLIENT: Final = "X-Nz-Client"
#: Caddy's `{http.request.uuid}`: one id for policyd, Ollama and the access log.
H_REQUEST_ID: Final = "X-Request-Id"

#: On refusals only: a short machine-readable reason code (sent to the client too).
H_REFUSAL: Final = "X-Nz-Refusal"
#: On refusals only: who was refused (`Refused.encode`). Caddy logs it as `LOG_REFUSED`
#: and removes it from the client's answer (forward_auth's `handle_response`).
H_REFUSED: Final = "X-Nz-Refused"

# What policyd answers on 2xx. Caddy deletes any client-sent copy, then copies these
# onto the proxied request. Each copied name costs Caddy two routes per request, so the
# verdict travels as one value (`Grant`) and the rate-limit figures as one per unit.
#: The verdict for Caddy's matchers and meterd's log field, see `Grant.encode`.
H_GRANT: Final = "X-Nz-Grant"
#: "<limit> <remaining> <reset seconds>" of the request limit, only when one applies.
H_RATE_REQUESTS: Final = "X-Nz-Rate-Requests"
#: The same for the token limit.
H_RATE_TOKENS: Final = "X-Nz-Rate-Tokens"

#: The body Ollama receives: policyd's canonical re-serialisation of the admitted body,
#: compact ASCII JSON. Caddy sets it as the upstream body (`request_body set`) and strips
#: the header before Ollama; the access log never holds request headers.
H_UPSTREAM_BODY: Final = "X-Nz-Upstream-Body"
#: A model listing policyd filtered for the key (`/api/tags`, `/api/ps`, `/v1/models`):
#: Caddy answers the client with it and never asks Ollama.
H_LISTING: Final = "X-Nz-Listing"

#: With several Ollama hosts: which host should serve the request, as the `Cookie` value
#: Caddy's `lb_policy cookie` reads (`copy_headers X-Nz-Route>Cookie`, which also drops
#: any cookie the client sent). See policyd/authz/upstreams.py.
H_ROUTE: Final = "X-Nz-Route"

COPIED_HEADERS: Final = (
    H_GRANT,
    H_RATE_REQUESTS,
    H_RATE_TOKENS,
    H_UPSTREAM_BODY,
    H_LISTING,
    H_ROUTE,
)

#: The top-level access-log field naming the Ollama host that served the request.
LOG_UPSTREAM: Final = "upstream"

#: OpenAI-style rate-limit headers Caddy sets on the client's response (streams
#: included) from `H_RATE_REQUESTS` and `H_RATE_TOKENS`.
RATE_LIMIT_HEADERS: Final = tuple(
    f"X-Ratelimit-{kind}-{unit}"
    for unit in ("Requests", "Tokens")
    for kind in ("Limit", "Remaining", "Reset")
)

#: The top-level access-log field `log_append` fills with the grant after forward_auth.
LOG_GRANT: Final = "nz_grant"
#: The top-level access-log field holding `H_REFUSED` of a refusal.
LOG_REFUSED: Final = "nz_refused"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Grant:
    """An admitted request as Caddy and meterd see it: the value of `H_GRANT`."""

    key_id: str
    key_prefix: str
    tenant_id: str
    surface: str
    stream: bool
    #: Caddy logs the response body (non-streamed replies that carry usage).
    capture: bool = False
    #: Caddy logs the request body (the key opted into prompt logging).
    prompt_log: bool = False
    #: An OpenAI stream asked for `stream_options.include_usage`.
    stream_usage: bool = False
    #: Tokens reserved at admission (estimated prompt + maximum output).
    reserved: int | None = None
    #: policyd's count of the tokenisable content it admitted (prompt text, context ids,
    #: images, tools, system, template, suffix, format): the prompt part of `reserved`,
    #: so meterd can estimate a streamed reply's prompt from it, never from raw bytes, and
    #: the least a request whose body reached Ollama pays, even when its client left.
    prompt: int | None = None
    model: str | None = None

    def encode(self) -> str:
        """`log=<c|-><p|-> key=… prefix=… tenant=… surface=… stream=0|1 usage=0|1 …`.

        Optional tail, in order: `reserved=<tokens> prompt=<tokens> model=<name>`.

        Space-separated name=value pairs. `log` comes first, so Caddy's header matchers
        test the flags by prefix (`log=c*`) where no other value can reach; `model`,
        the only value a client chooses (printable ASCII, no spaces), comes last.
        """
        parts = [
            f"log={'c' if self.capture else '-'}{'p' if self.prompt_log else '-'}",
            f"key={self.key_id}",
            f"prefix={self.key_prefix}",
            f"tenant={self.tenant_id}",
            f"surface={self.surface}",
            f"stream={int(self.stream)}",
            f"usage={int(self.stream_usage)}",
        ]
        if self.reserved is not None:
            parts.append(f"reserved={self.reserved}")
        if self.prompt is not None:
            parts.append(f"prompt={self.prompt}")
        if self.model is not None:
            parts.append(f"model={self.model}")
        return " ".join(parts)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Refused:
    """Who a refusal was for: the value of `H_REFUSED`.

    A verified key is named by id, prefix and tenant (and the model, once the body was
    read); a key that failed verification only by the prefix it claimed (`claimed`),
    which the audit keeps apart so it is never mistaken for a verified one.
    """

    key_id: str | None = None
    key_prefix: str | None = None
    tenant_id: str | None = None
    model: str | None = None
    claimed_prefix: str | None = None

    def encode(self) -> str:
        """`key=… prefix=… tenant=… model=…` or `claimed=nz_…` (as `Grant`, model last)."""
        parts = []
        if self.key_id is not None:
            parts.append(f"key={self.key_id}")
        if self.key_prefix is not None:
            parts.append(f"prefix={self.key_prefix}")
        if self.tenant_id is not None:
            parts.append(f"tenant={self.tenant_id}")
        if self.claimed_prefix is not None:
            parts.append(f"claimed={self.claimed_prefix}")
        if self.model is not None:
            parts.append(f"model={self.model}")
        return " ".join(parts)


def parse_grant(value: str) -> dict[str, str]:
    """The name=value pairs of an encoded grant, unchecked (the first of a name counts)."""
    fields: dict[str, str] = {}
    for token in value.split(" "):
        name, sep, item = token.partition("=")
        if sep and name not in fields:
            fields[name] = item
    return fields


#: Keys look like `nz_<8 lowercase base32 chars>_<43 base62 chars>`.
KEY_SCHEME: Final = "nz_"
KEY_PREFIX_LEN: Final = 8


class Surface(enum.StrEnum):
    """Which API the caller speaks; decides the error format."""

    OLLAMA = "ollama"
    OPENAI = "openai"


def calendar_day(at: dt.datetime) -> str:
    """Budget day of a moment (UTC calendar), e.g. `20261126`."""
    # Not strftime: it reads /etc/localtime on every call when TZ is unset (meterd calls
    # this per log line).
    day = at.astimezone(dt.UTC)
    return f"{day.year:04d}{day.month:02d}{day.day:02d}"


def calendar_month(at: dt.datetime) -> str:
    """Budget month of a moment (UTC calendar), e.g. `202611`."""
    month = at.astimezone(dt.UTC)
    return f"{month.year:04d}{month.month:02d}"


def _lua(name: str) -> str:
    return resources.files("policyd.shared").joinpath("lua", name).read_text(encoding="utf-8")


def admit_script() -> str:
    """Lua source of the admission script (`policyd/shared/lua/admit.lua`)."""
    return _lua("admit.lua")


def load_script() -> str:
    """Lua source of the tenant counter rebuild (`policyd/shared/lua/load.lua`)."""
    return _lua("load.lua")


def release_script() -> str:
    """Lua source of the early lease release (`policyd/shared/lua/release.lua`)."""
    return _lua("release.lua")


def settle_script() -> str:
    """Lua source of the settle script (`policyd/shared/lua/settle.lua`)."""
    return _lua("settle.lua")

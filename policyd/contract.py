"""What policyd, Caddy and meterd must agree on.

This module is dependency-free on purpose: meterd imports it, and the Caddyfiles and
docs name the same headers and log fields. Change a name here and in `caddy/` together.
"""

from __future__ import annotations

import datetime as dt
import enum
from importlib import resources
from typing import Final

__all__ = [
    "AUTHZ_PATH",
    "COPIED_HEADERS",
    "H_BODY",
    "H_CAPTURE",
    "H_KEY_ID",
    "H_KEY_PREFIX",
    "H_MODEL",
    "H_PROMPT_LOG",
    "H_REFUSAL",
    "H_REQUEST_ID",
    "H_RESERVED",
    "H_STREAM",
    "H_STREAM_USAGE",
    "H_SURFACE",
    "H_TENANT_ID",
    "KEY_PREFIX_LEN",
    "KEY_SCHEME",
    "LOG_FIELDS",
    "RATE_LIMIT_HEADERS",
    "Surface",
    "admit_script",
    "calendar_day",
    "calendar_month",
    "load_script",
    "redis_key_record",
    "redis_reservation",
    "settle_call",
    "settle_script",
    "tenant_base",
    "tenant_slot",
]

#: Where Caddy's forward_auth asks policyd.
AUTHZ_PATH: Final = "/authz"

#: Request header Caddy fills with `{http.request.body_base64}` for policyd only.
H_BODY: Final = "X-Nz-Body"
#: Caddy's `{http.request.uuid}`: one id for policyd, Ollama and the access log.
H_REQUEST_ID: Final = "X-Request-Id"

# Headers policyd answers with on 2xx; Caddy copies them onto the proxied request
# (deleting any client-sent copies first) and logs them with `log_append`.
H_KEY_ID: Final = "X-Nz-Key-Id"
H_KEY_PREFIX: Final = "X-Nz-Key-Prefix"
H_TENANT_ID: Final = "X-Nz-Tenant-Id"
H_SURFACE: Final = "X-Nz-Surface"
H_MODEL: Final = "X-Nz-Model"
H_STREAM: Final = "X-Nz-Stream"
#: "1" when Caddy should capture the (non-streamed) response body into the log.
H_CAPTURE: Final = "X-Nz-Capture"
#: "1" when the key opted into prompt logging.
H_PROMPT_LOG: Final = "X-Nz-Prompt-Log"
#: Tokens reserved at admission (estimated prompt + max output).
H_RESERVED: Final = "X-Nz-Reserved"
#: "1" when an OpenAI stream asked for `stream_options.include_usage` (longer events).
H_STREAM_USAGE: Final = "X-Nz-Stream-Usage"
#: On refusals only: a short machine-readable reason code (sent to the client too).
H_REFUSAL: Final = "X-Nz-Refusal"

COPIED_HEADERS: Final = (
    H_KEY_ID,
    H_KEY_PREFIX,
    H_TENANT_ID,
    H_SURFACE,
    H_MODEL,
    H_STREAM,
    H_CAPTURE,
    H_PROMPT_LOG,
    H_RESERVED,
    H_STREAM_USAGE,
)

#: OpenAI-style rate-limit headers: policyd answers them, Caddy copies them onto the
#: request and sets them on the client's response (streams included).
RATE_LIMIT_HEADERS: Final = tuple(
    f"X-Ratelimit-{kind}-{unit}"
    for unit in ("Requests", "Tokens")
    for kind in ("Limit", "Remaining", "Reset")
)

#: Top-level access-log fields added by `log_append` (field name -> copied header).
LOG_FIELDS: Final = {
    "nz_key_id": H_KEY_ID,
    "nz_key_prefix": H_KEY_PREFIX,
    "nz_tenant_id": H_TENANT_ID,
    "nz_surface": H_SURFACE,
    "nz_model": H_MODEL,
    "nz_stream": H_STREAM,
    "nz_prompt_log": H_PROMPT_LOG,
    "nz_reserved": H_RESERVED,
    "nz_stream_usage": H_STREAM_USAGE,
}

#: Keys look like `nz_<8 lowercase base32 chars>_<43 base62 chars>`.
KEY_SCHEME: Final = "nz_"
KEY_PREFIX_LEN: Final = 8


class Surface(enum.StrEnum):
    """Which API the caller speaks; decides the error format."""

    OLLAMA = "ollama"
    OPENAI = "openai"


def redis_key_record(prefix: str) -> str:
    """Redis key holding the cached record of an API key (by its public prefix)."""
    return f"nz:key:{{{prefix}}}"


def tenant_slot(tenant_id: str) -> str:
    """Hash-slot tag shared by every Redis key of one tenant, so scripts stay atomic."""
    return f"{{t:{tenant_id}}}"


def redis_reservation(tenant_id: str, request_id: str) -> str:
    """Redis hash recording what admission reserved for one request (settled by meterd)."""
    return f"nz:{tenant_slot(tenant_id)}:res:{request_id}"


def tenant_base(tenant_id: str) -> str:
    """Common prefix of one tenant's Redis keys; the Lua scripts derive the same names."""
    return f"nz:{tenant_slot(tenant_id)}:"


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
    return resources.files("policyd").joinpath("lua", name).read_text(encoding="utf-8")


def admit_script() -> str:
    """Lua source of the admission script (`policyd/lua/admit.lua`)."""
    return _lua("admit.lua")


def load_script() -> str:
    """Lua source of the tenant counter rebuild (`policyd/lua/load.lua`)."""
    return _lua("load.lua")


def settle_script() -> str:
    """Lua source of the settle script (`policyd/lua/settle.lua`)."""
    return _lua("settle.lua")


def settle_call(
    *,
    tenant_id: str,
    key_id: str,
    request_id: str,
    prompt_tokens: int,
    completion_tokens: int,
    requested_at: dt.datetime,
    ledger_ms: int,
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV for one settle: `redis.eval(settle_script(), len(keys), *keys, *args)`.

    `requested_at` is when the request was admitted (it picks the budget day and the
    TPM bucket); `ledger_ms` is when its usage was committed to Postgres.
    """
    keys = [redis_reservation(tenant_id, request_id)]
    args: list[str | int] = [
        request_id,
        max(0, prompt_tokens),
        max(0, completion_tokens),
        ledger_ms,
        key_id,
        calendar_day(requested_at),
        calendar_month(requested_at),
        int(requested_at.timestamp()),
    ]
    return keys, args

"""What policyd, Caddy and meterd must agree on.

This module is dependency-free on purpose: meterd imports it, and the Caddyfiles and
docs name the same headers and log fields. Change a name here and in `caddy/` together.
"""

from __future__ import annotations

import enum
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
    "H_SURFACE",
    "H_TENANT_ID",
    "KEY_PREFIX_LEN",
    "KEY_SCHEME",
    "LOG_FIELDS",
    "Surface",
    "redis_key_record",
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

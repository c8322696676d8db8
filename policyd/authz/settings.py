"""Settings, read once from an explicit environment mapping.

Every problem is reported at once so an operator fixes the config in one go.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

import attrs

from policyd.authz.upstreams import Upstream, parse_upstreams
from policyd.shared.envreader import EnvReader, redacted_url
from policyd.shared.errors import SettingsError
from policyd.shared.sentinel import SentinelSettings, read_sentinels

__all__ = ["DEFAULT_MAX_BODY_BYTES", "Settings", "SettingsError", "load_settings"]

DEFAULT_MAX_BODY_BYTES: Final = 8 * 1024 * 1024
_MIN_SECRET_LEN: Final = 32
#: Default lease beyond the longest request: time for meterd to read the request's line.
_LEASE_MARGIN_S: Final = 15.0
_MAX_CONCURRENCY_WAIT_MS: Final = 10_000
#: A held refusal keeps a Caddy connection and a policyd task: bounded in time and number.
_MAX_TARPIT_MS: Final = 10_000
_MAX_TARPIT_HELD: Final = 10_000
#: Refusals held at once by default: more than a single attacker's connections usually
#: are, few beside what a socket and Granian carry (serve.py sizes Granian for them).
DEFAULT_TARPIT_MAX_HELD: Final = 1024


@attrs.frozen(kw_only=True)
class Settings:
    """Everything policyd and the CLI need, validated."""

    database_url: str = attrs.field(repr=redacted_url)
    redis_url: str = attrs.field(repr=redacted_url)
    #: NZ_REDIS_SENTINELS: the primary is whichever these name (the URL's host is unused).
    sentinels: SentinelSettings | None = None
    #: NZ_OLLAMA_URL: the Ollama hosts, in the order given (space-separated there).
    upstreams: tuple[Upstream, ...]
    key_hmac_secret: bytes = attrs.field(repr=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: How long a verified key stays trusted in-process before Redis is asked again.
    #: Bounds how late a revocation is seen by a running policyd.
    key_cache_ttl_s: float = 0.5
    #: How long a verified key's digest stays in Redis (renewed on every Argon2 check).
    redis_key_ttl_s: int = 3600
    #: How long an unknown prefix is remembered, sparing Postgres repeated lookups.
    negative_cache_ttl_s: int = 30
    #: Seconds a single store call may take before the request fails closed (503).
    store_timeout_s: float = 2.0
    #: Seconds the readiness probe waits for each dependency.
    ready_timeout_s: float = 2.0
    #: Longest a request may run: Caddy cuts a response still being written after it
    #: (its server write timeout is the same NZ_MAX_REQUEST_S). Leases are sized by it.
    max_request_s: float = 600.0
    #: How long a concurrency lease holds a slot if its release never arrives (meterd
    #: down): the longest request plus a margin for meterd to read its line.
    lease_ttl_s: float = 615.0
    #: How long admission waits for a concurrency slot that a request just ended is
    #: about to give back (meterd releases it within its lease poll), before a 429.
    concurrency_wait_s: float = 1.0
    #: How often last-used timestamps are flushed to Postgres.
    last_used_flush_s: float = 5.0
    #: Prompt tokens one image counts for in a reservation (models differ: 256 to ~1600).
    image_tokens: int = 1024
    #: Output cap written into a request that names none when neither its key nor its
    #: tenant sets `max_output_tokens`.
    default_output_tokens: int = 1024
    #: How often each host's `/api/tags` is read (which models it serves).
    upstream_refresh_s: float = 5.0
    #: How long a failed (prefix, secret) is remembered: it never reaches Argon2id twice.
    auth_failure_memory_s: int = 600
    #: The window in which a prefix's failed secrets are counted against its budget.
    auth_failure_window_s: int = 60
    #: Unverified secrets checked per prefix and window; then the prefix's unverified
    #: secrets are refused (429) without Argon2id until the window ends.
    auth_failure_budget: int = 10
    #: Argon2id hashes a second (per process) for prefixes that failed recently.
    auth_suspect_per_s: float = 4.0
    #: How long the answer to a repeated authentication failure is held back (0: never).
    auth_tarpit_s: float = 1.0
    #: Failures a client may have in `auth_failure_window_s` before all its failures are
    #: held back, whatever key they name.
    auth_tarpit_client_budget: int = 30
    #: Answers held back at once (per process); past it, repeats are answered at once.
    auth_tarpit_max_held: int = DEFAULT_TARPIT_MAX_HELD
    log_level: str = "INFO"

    @property
    def ollama_url(self) -> str:
        """The first host (the only one in a single-host setup)."""
        return self.upstreams[0].url


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build settings from `env` (default: the process environment); raise on any problem."""
    read = EnvReader(os.environ if env is None else env)
    database_url = read.url("NZ_DATABASE_URL", ("postgresql+asyncpg",))
    redis_url = read.url("NZ_REDIS_URL", ("redis", "rediss", "unix"))
    sentinels = read_sentinels(read)
    upstreams, upstream_errors = parse_upstreams(read.text("NZ_OLLAMA_URL"))
    read.errors.extend(upstream_errors)
    secret = read.required("NZ_KEY_HMAC_SECRET")
    if secret and len(secret) < _MIN_SECRET_LEN:
        read.errors.append(f"NZ_KEY_HMAC_SECRET must be at least {_MIN_SECRET_LEN} characters")
    max_body = read.number("NZ_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, integer=True)
    cache_ttl_ms = read.number("NZ_KEY_CACHE_TTL_MS", 500, integer=True)
    timeout_ms = read.number("NZ_STORE_TIMEOUT_MS", 2000, integer=True)
    max_request = read.number("NZ_MAX_REQUEST_S", 600)
    lease_ttl = read.number("NZ_LEASE_TTL_S", max_request + _LEASE_MARGIN_S)
    if lease_ttl < max_request:
        read.errors.append(
            "NZ_LEASE_TTL_S must be at least NZ_MAX_REQUEST_S (a lease must outlive its request)"
        )
    wait_ms = read.number("NZ_CONCURRENCY_WAIT_MS", 1000, integer=True, above=-1)
    if wait_ms > _MAX_CONCURRENCY_WAIT_MS:
        read.errors.append(f"NZ_CONCURRENCY_WAIT_MS must be at most {_MAX_CONCURRENCY_WAIT_MS}")
    refresh_s = read.number("NZ_UPSTREAM_REFRESH_S", 5)
    log_level = read.log_level("NZ_LOG_LEVEL")
    image_tokens = read.number("NZ_IMAGE_TOKENS", 1024, integer=True, above=-1)
    default_output = read.number("NZ_DEFAULT_OUTPUT_TOKENS", 1024, integer=True)
    if not 1 <= default_output <= 1_048_576:
        read.errors.append("NZ_DEFAULT_OUTPUT_TOKENS must be between 1 and 1048576")
    if not 0 <= image_tokens <= 1_000_000:
        read.errors.append("NZ_IMAGE_TOKENS must be between 0 and 1000000")
    failure_memory = read.number("NZ_AUTH_FAILURE_MEMORY_S", 600, integer=True)
    failure_window = read.number("NZ_AUTH_FAILURE_WINDOW_S", 60, integer=True)
    failure_budget = read.number("NZ_AUTH_FAILURE_BUDGET", 10, integer=True)
    suspect_rate = read.number("NZ_AUTH_SUSPECT_PER_S", 4.0)
    tarpit_ms = read.number("NZ_AUTH_TARPIT_MS", 1000, integer=True, above=-1)
    if tarpit_ms > _MAX_TARPIT_MS:
        read.errors.append(f"NZ_AUTH_TARPIT_MS must be at most {_MAX_TARPIT_MS}")
    tarpit_budget = read.number("NZ_AUTH_TARPIT_CLIENT_BUDGET", 30, integer=True)
    tarpit_held = read.number("NZ_AUTH_TARPIT_MAX_HELD", DEFAULT_TARPIT_MAX_HELD, integer=True)
    if tarpit_held > _MAX_TARPIT_HELD:
        read.errors.append(f"NZ_AUTH_TARPIT_MAX_HELD must be at most {_MAX_TARPIT_HELD}")
    if read.errors:
        raise SettingsError("invalid configuration: " + "; ".join(read.errors))
    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        sentinels=sentinels,
        upstreams=upstreams,
        key_hmac_secret=secret.encode(),
        max_body_bytes=int(max_body),
        key_cache_ttl_s=cache_ttl_ms / 1000,
        store_timeout_s=timeout_ms / 1000,
        max_request_s=max_request,
        lease_ttl_s=lease_ttl,
        upstream_refresh_s=refresh_s,
        concurrency_wait_s=wait_ms / 1000,
        log_level=log_level,
        image_tokens=int(image_tokens),
        default_output_tokens=int(default_output),
        auth_failure_memory_s=int(failure_memory),
        auth_failure_window_s=int(failure_window),
        auth_failure_budget=int(failure_budget),
        auth_suspect_per_s=suspect_rate,
        auth_tarpit_s=tarpit_ms / 1000,
        auth_tarpit_client_budget=int(tarpit_budget),
        auth_tarpit_max_held=int(tarpit_held),
    )

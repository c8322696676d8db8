"""The cached view of one API key: identity, status, and the limits of key and tenant.

Stored in Redis as msgspec JSON under `keyspace.key_record(prefix)`, and held in
each policyd process for a fraction of a second. It carries the keyed digest of the key,
never the key or its Argon2 hash.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from policyd.shared.tables import LIMIT_COLUMNS

__all__ = ["KeyRecord", "Limits", "decode_record", "encode_record", "limits_from_row"]

# The limit columns of both tables, read into `Limits` by the same names.
_LIMIT_FIELDS: Final = LIMIT_COLUMNS


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Limit and policy values of one level (key or tenant); None = not set there."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    total_tokens: int | None = None
    max_output_tokens: int | None = None
    #: Longest keep_alive a client may ask for; unset = the client's is removed.
    max_keep_alive_seconds: int | None = None
    #: Largest num_ctx a client may ask for; unset = the client's is removed.
    max_num_ctx: int | None = None
    allowed_models: tuple[str, ...] | None = None
    prompt_logging: bool | None = None
    prompt_retention_days: int | None = None


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the hot path needs to authorise one key without Postgres."""

    key_id: str
    prefix: str
    tenant_id: str
    tenant_name: str
    #: HMAC of the full key under the server secret, set after one Argon2id success.
    digest: str
    #: Unix time after which the key is refused; None = never expires.
    expires_at: float | None
    revoked: bool
    key_limits: Limits
    tenant_limits: Limits
    budget_timezone: str | None = None

    @property
    def prompt_logging(self) -> bool:
        """Key setting over tenant default; off unless someone turned it on."""
        own = self.key_limits.prompt_logging
        return bool(own if own is not None else self.tenant_limits.prompt_logging)


_ENCODER: Final = msgspec.json.Encoder()
_DECODER: Final = msgspec.json.Decoder(KeyRecord)


def encode_record(record: KeyRecord) -> bytes:
    return _ENCODER.encode(record)


def decode_record(raw: bytes) -> KeyRecord:
    """Decode a cached record; raises msgspec.DecodeError on a corrupt entry."""
    return _DECODER.decode(raw)


def limits_from_row(row: Any, *, prefix: str = "") -> Limits:
    """Limits from a SQL row whose limit columns are named `<prefix><column>`."""
    values = {name: getattr(row, prefix + name) for name in _LIMIT_FIELDS}
    models = values["allowed_models"]
    values["allowed_models"] = tuple(models) if models is not None else None
    return Limits(**values)

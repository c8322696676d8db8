"""Release concurrency leases as soon as a request's line is in the log.

A lease must depend on nothing but its request having ended. Settlement waits for
Postgres (the audit row and the ledger come first, see settle.py); the lease does not:
a second follower reads the same log, a little ahead of settlement, takes each line's
request id and tenant, and runs `release.lua` for them, one round trip per read. It
keeps no checkpoint of its own: it starts where settlement stands (the release is
idempotent, a line released twice changes nothing) and follows the log from there,
so while Postgres is down leases are still released within a poll interval, and a
budget's reservation stays charged (fail-closed) until settlement catches up.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Final

import msgspec

from meterd.parse import Event, parse_line
from meterd.settle_script import Call
from meterd.tail import Line
from policyd.shared.contract import LOG_GRANT, parse_grant
from policyd.shared.keyspace import release_call

__all__ = ["release_calls"]


class _Head(msgspec.Struct):
    """The two fields a release needs; msgspec skips the rest of the line unread."""

    uuid: str | None = None
    nz_grant: str | None = msgspec.field(default=None, name=LOG_GRANT)


_DECODER: Final = msgspec.json.Decoder(_Head)


def _canonical(value: str | None) -> str | None:
    if value is None or not 32 <= len(value) <= 36:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def _ids(line: Line) -> tuple[str, str, str] | None:
    """(tenant id, key id, request id) of an admitted request's line; else None."""
    if line.truncated:
        event = parse_line(line.data, truncated=True)
        if not isinstance(event, Event) or event.tenant_id is None or event.key_id is None:
            return None
        return str(event.tenant_id), str(event.key_id), str(event.request_id)
    try:
        head = _DECODER.decode(line.data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # settlement counts and logs bad lines; nothing to release here
    grant = parse_grant(head.nz_grant) if head.nz_grant else {}
    request_id = _canonical(head.uuid)
    tenant_id, key_id = _canonical(grant.get("tenant")), _canonical(grant.get("key"))
    if request_id is None or tenant_id is None or key_id is None:
        return None
    return tenant_id, key_id, request_id


def release_calls(lines: Sequence[Line]) -> list[Call]:
    """One `release.lua` call per admitted request among `lines`."""
    calls: list[Call] = []
    for line in lines:
        ids = _ids(line)
        if ids is not None:
            tenant_id, key_id, request_id = ids
            calls.append(release_call(tenant_id=tenant_id, key_id=key_id, request_id=request_id))
    return calls

"""Every Redis key name and scan pattern the gateway uses, and the KEYS of every script.

One module builds them all, so policyd, meterd, the CLI and the Lua scripts cannot drift
apart. Every script receives every key it touches through KEYS (Redis requires it: a
cluster or a key-routing proxy routes and checks a script by its declared keys); the
scripts build no key names of their own, `tests/shared/test_keyspace.py` watches them
run and checks that.

Layout (every key of one tenant carries the hash tag `{t:<tenant id>}`, so a tenant's
scripts touch one slot):

    nz:key:{<prefix>}                       cached record of an API key (policyd)
    nz:authfail:{<prefix>}:<digest>         a failed secret for a prefix, by keyed digest
    nz:authfails:{<prefix>}                 a prefix's verifications in the failure window
    nz:{t:<tenant>}:rpm:k:<key id>          request window of a key   (rpm:t: the tenant's)
    nz:{t:<tenant>}:tpm:k:<key id>          token window              (tpm:t)
    nz:{t:<tenant>}:conc:k:<key id>         concurrency leases        (conc:t)
    nz:{t:<tenant>}:day:k:<key id>:<day>    daily budget counter      (day:t:<day>)
    nz:{t:<tenant>}:mon:k:<key id>:<month>  monthly budget counter    (mon:t:<month>)
    nz:{t:<tenant>}:tot:k:<key id>          total budget counter      (tot:t)
    nz:{t:<tenant>}:res:<request id>        one admitted request's reservation and lease
    nz:{t:<tenant>}:done:<request id>       settled marker (settlement is idempotent)
    nz:{t:<tenant>}:loaded                  the tenant's budget counters are in Redis
    nz:meterd:heartbeat:<node>              a meterd node's liveness and lag
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Final

from policyd.shared.contract import calendar_day, calendar_month

__all__ = [
    "DIMENSIONS",
    "HEARTBEAT_PATTERN",
    "RESERVATION_PATTERN",
    "BudgetCounter",
    "admission_keys",
    "auth_failure",
    "auth_failures",
    "heartbeat",
    "key_record",
    "load_call",
    "release_call",
    "reservation",
    "reservation_request_id",
    "scope_keys",
    "settle_call",
    "tenant_base",
    "tenant_pattern",
]

#: The limit dimensions in the admission script's order (each for key, then tenant).
DIMENSIONS: Final = (
    "rpm",
    "tpm",
    "concurrency",
    "daily_tokens",
    "monthly_tokens",
    "total_tokens",
)

#: SCAN pattern of every reservation hash (meterd's sweep).
RESERVATION_PATTERN: Final = "nz:{t:*}:res:*"
#: SCAN pattern of every meterd heartbeat.
HEARTBEAT_PATTERN: Final = "nz:meterd:heartbeat:*"

_RESERVATION_MARK: Final = ":res:"

#: A budget counter to set when a tenant's counters are rebuilt: key, value, ttl
#: seconds (0: none).
BudgetCounter = tuple[str, int, int]


def key_record(prefix: str) -> str:
    """The cached record of an API key, by its public prefix."""
    return f"nz:key:{{{prefix}}}"


def auth_failure(prefix: str, digest: str) -> str:
    """One failed (prefix, secret), by the key's keyed digest (never the secret itself)."""
    return f"nz:authfail:{{{prefix}}}:{digest[:32]}"


def auth_failures(prefix: str) -> str:
    """A prefix's verifications counted in the current failure window."""
    return f"nz:authfails:{{{prefix}}}"


def heartbeat(node: str) -> str:
    """A meterd node's heartbeat."""
    return f"nz:meterd:heartbeat:{node}"


def tenant_base(tenant_id: str) -> str:
    """The common start of one tenant's keys, hash tag included."""
    return f"nz:{{t:{tenant_id}}}:"


def tenant_pattern(tenant_id: str) -> str:
    """SCAN pattern of every key of one tenant."""
    return f"{tenant_base(tenant_id)}*"


def reservation(tenant_id: str, request_id: str) -> str:
    """The hash admission writes for one request (reservation and lease)."""
    return f"{tenant_base(tenant_id)}res:{request_id}"


def reservation_request_id(redis_key: str) -> str | None:
    """The request id in a reservation's key name; None for any other key."""
    _, sep, request_id = redis_key.rpartition(_RESERVATION_MARK)
    return request_id if sep and request_id else None


def scope_keys(tenant_id: str, key_id: str | None, *, day: str, month: str) -> list[str]:
    """One scope's six counters in DIMENSIONS order: the key's, or the tenant's (None)."""
    base = tenant_base(tenant_id)
    scope = f"k:{key_id}" if key_id is not None else "t"
    return [
        f"{base}rpm:{scope}",
        f"{base}tpm:{scope}",
        f"{base}conc:{scope}",
        f"{base}day:{scope}:{day}",
        f"{base}mon:{scope}:{month}",
        f"{base}tot:{scope}",
    ]


def admission_keys(
    tenant_id: str, key_id: str, request_id: str, *, day: str, month: str
) -> list[str]:
    """KEYS of `admit.lua`, in its order (key then tenant per dimension)."""
    # Inline f-strings, not scope_keys(): this runs once per request on the hot path.
    base = f"nz:{{t:{tenant_id}}}:"
    return [
        f"{base}rpm:k:{key_id}",
        f"{base}rpm:t",
        f"{base}tpm:k:{key_id}",
        f"{base}tpm:t",
        f"{base}conc:k:{key_id}",
        f"{base}conc:t",
        f"{base}day:k:{key_id}:{day}",
        f"{base}day:t:{day}",
        f"{base}mon:k:{key_id}:{month}",
        f"{base}mon:t:{month}",
        f"{base}tot:k:{key_id}",
        f"{base}tot:t",
        f"{base}res:{request_id}",
        f"{base}loaded",
    ]


def release_call(
    *, tenant_id: str, key_id: str, request_id: str
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of `release.lua`: the request's key and tenant lease sets."""
    base = tenant_base(tenant_id)
    return [f"{base}conc:k:{key_id}", f"{base}conc:t"], [request_id]


def settle_call(
    *,
    tenant_id: str,
    key_id: str,
    request_id: str,
    prompt_tokens: int,
    completion_tokens: int,
    requested_at: dt.datetime,
    ledger_ms: int,
    day: str | None = None,
    month: str | None = None,
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of `settle.lua` for one request.

    `requested_at` is when the request was admitted: it names the budget day and month
    (unless `day`/`month` are given: the script answers with the reservation's own when
    they differ, e.g. a request admitted a moment after midnight) and the TPM second;
    `ledger_ms` is when its usage was committed to Postgres.
    """
    day = day or calendar_day(requested_at)
    month = month or calendar_month(requested_at)
    base = tenant_base(tenant_id)
    keys = [
        f"{base}res:{request_id}",
        f"{base}done:{request_id}",
        f"{base}loaded",
        f"{base}conc:k:{key_id}",
        f"{base}conc:t",
        f"{base}tpm:k:{key_id}",
        f"{base}tpm:t",
        f"{base}day:k:{key_id}:{day}",
        f"{base}day:t:{day}",
        f"{base}mon:k:{key_id}:{month}",
        f"{base}mon:t:{month}",
        f"{base}tot:k:{key_id}",
        f"{base}tot:t",
    ]
    args: list[str | int] = [
        request_id,
        max(0, prompt_tokens),
        max(0, completion_tokens),
        ledger_ms,
        day,
        month,
        int(requested_at.timestamp()),
    ]
    return keys, args


def load_call(
    tenant_id: str, *, now_ms: int, counters: Sequence[BudgetCounter] = ()
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of `load.lua`: the loaded sentinel, then each counter with its value."""
    keys = [f"{tenant_base(tenant_id)}loaded", *(key for key, _, _ in counters)]
    args: list[str | int] = [now_ms]
    for _, value, ttl in counters:
        args += [value, ttl]
    return keys, args

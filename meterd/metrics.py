"""meterd's Prometheus metrics and the internal listener that serves them.

Label values come from closed sets (line results, token kinds, usage sources), except
the tenant label of `nz_meterd_tenant_tokens_total`, which is bounded by a rule: the
first `NZ_METERD_METRICS_TENANTS` tenants this process settles usage for get their own
series (labelled with the tenant id), every later one is counted under `other`. So the
series count never grows past that number + 1, whatever the tenants do; a restart
starts naming afresh (counters restart at zero anyway, which `rate()` handles).

The listener (`prometheus_client`'s own HTTP server, in a thread) binds
`NZ_METERD_METRICS_BIND:NZ_METERD_METRICS_PORT`, 127.0.0.1 by default: never a public
address unless an operator says so.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Final

from prometheus_client import Counter, Gauge, start_http_server

if TYPE_CHECKING:
    from meterd.records import Record

__all__ = [
    "LAG_BYTES",
    "LAG_SECONDS",
    "LINES",
    "OTHER_TENANTS",
    "RETRYING",
    "SWEPT",
    "TENANT_TOKENS",
    "TOKENS",
    "TenantLabels",
    "count_lines",
    "count_quarantined",
    "serve",
    "settled",
    "swept",
    "watch",
]

OTHER_TENANTS: Final = "other"

LINES: Final = Counter(
    "nz_meterd_lines",
    "Access-log lines read, by result: settled (new audit row), duplicate (already "
    "settled, e.g. a replay), bad (unreadable, skipped), skipped (probes); quarantined "
    "counts, among the settled, rows Postgres refused (audited as meter_quarantined).",
    ["result"],
)
TOKENS: Final = Counter(
    "nz_meterd_tokens",
    "Tokens settled, by kind (prompt, completion) and usage source (exact, estimated, reserved).",
    ["kind", "usage_source"],
)
TENANT_TOKENS: Final = Counter(
    "nz_meterd_tenant_tokens",
    "Tokens settled per tenant id; tenants past NZ_METERD_METRICS_TENANTS count as 'other'.",
    ["tenant"],
)
SWEPT: Final = Counter(
    "nz_meterd_swept_reservations",
    "Reservations charged as reserved because their log line never arrived.",
)
LAG_SECONDS: Final = Gauge(
    "nz_meterd_lag_seconds",
    "While behind: seconds since the start of the last settled request; 0 when caught up.",
)
LAG_BYTES: Final = Gauge("nz_meterd_lag_bytes", "Bytes of access log not yet settled.")
RETRYING: Final = Gauge(
    "nz_meterd_store_retrying",
    "1 while settlement waits for Postgres or Redis to come back, else 0.",
)


class TenantLabels:
    """The tenant label of a settled request: its id for the first `limit` tenants seen."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def label(self, tenant_id: str) -> str:
        if tenant_id in self._named:
            return tenant_id
        with self._lock:
            if len(self._named) < self._limit:
                self._named.add(tenant_id)
                return tenant_id
        return OTHER_TENANTS


_tenants = TenantLabels(0)


def configure(*, tenant_limit: int) -> None:
    """Set the tenant rule (once, at start; tests set it too)."""
    global _tenants
    _tenants = TenantLabels(tenant_limit)


def count_quarantined(count: int) -> None:
    """Requests whose row Postgres refused, settled fail-closed (settle.py)."""
    LINES.labels("quarantined").inc(max(count, 0))


def count_lines(*, lines: int, bad: int, records: int, inserted: int) -> None:
    """One settled batch: `records` measured lines, `inserted` of them new audit rows."""
    # Counters refuse negative steps with ValueError: a miscount here must never stop
    # settlement, so every step is clamped.
    LINES.labels("settled").inc(max(inserted, 0))
    LINES.labels("duplicate").inc(max(records - inserted, 0))
    LINES.labels("bad").inc(max(bad, 0))
    LINES.labels("skipped").inc(max(lines - bad - records, 0))


def settled(records: Iterable[Record]) -> None:
    """Tokens of the requests a batch settled for the first time (replays excluded)."""
    for record in records:
        usage = record.usage
        if usage.total == 0:
            continue
        source = usage.source.value
        prompt, completion = max(usage.prompt_tokens, 0), max(usage.completion_tokens, 0)
        TOKENS.labels("prompt", source).inc(prompt)
        TOKENS.labels("completion", source).inc(completion)
        tenant = record.event.tenant_id
        if tenant is not None:
            TENANT_TOKENS.labels(_tenants.label(str(tenant))).inc(prompt + completion)


def swept(count: int) -> None:
    SWEPT.inc(max(count, 0))


def watch(
    *,
    lag_seconds: Callable[[], float],
    lag_bytes: Callable[[], float],
    retrying: Callable[[], bool],
) -> None:
    """Read the gauges from the daemon at scrape time."""
    LAG_SECONDS.set_function(lag_seconds)
    LAG_BYTES.set_function(lag_bytes)
    RETRYING.set_function(lambda: 1.0 if retrying() else 0.0)


def serve(*, bind: str, port: int) -> Callable[[], None]:
    """Start the listener in a daemon thread; returns its stop. OSError: address taken."""
    server, thread = start_http_server(port, addr=bind)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5.0)

    return stop

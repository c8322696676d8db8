"""policyd's Prometheus metrics, and the few calls the hot path makes to move them.

Every label value comes from a closed set (refusal codes, surfaces, store names), so the
series count is fixed whatever clients send. The hot path resolves each label
combination once and keeps the child, so a decision costs a dict lookup and two
lock-protected additions (docs/performance.md has the measured cost).

Served as `/metrics` on policyd's unix socket (Caddy's public site never routes there;
its internal metrics listener does). With several Granian workers, start-policyd (serve.py)
gives each run a fresh `PROMETHEUS_MULTIPROC_DIR`; prometheus_client then keeps the
values in per-process files and `exposition()` sums them over the workers.
"""

from __future__ import annotations

import os
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

from policyd.shared.contract import Surface
from policyd.shared.errors import StoreFault, StoreUnavailable

__all__ = [
    "ARGON2_RUNS",
    "CONTENT_TYPE",
    "DECISIONS",
    "DECISION_SECONDS",
    "KEY_CACHE",
    "STORE_ERRORS",
    "argon2_run",
    "auth_held",
    "decided",
    "exposition",
    "failed",
    "key_cache",
    "store_error",
]

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

#: Outcomes of one `/authz` call.
ADMITTED: Final = "admitted"
REFUSED: Final = "refused"
ERROR: Final = "error"

DECISIONS: Final = Counter(
    "nz_policyd_decisions",
    "forward_auth decisions by outcome (admitted, refused, error), refusal code and API surface.",
    ["outcome", "code", "surface"],
)
# A decision from the caches takes ~100 µs; an Argon2 run (cache miss) tens of ms.
DECISION_SECONDS: Final = Histogram(
    "nz_policyd_decision_seconds",
    "Time policyd spent deciding one forward_auth call (excluding the HTTP server).",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
KEY_CACHE: Final = Counter(
    "nz_policyd_key_cache",
    "Key record lookups by cache (process, redis) and result; a process miss is a redis lookup.",
    ["cache", "result"],
)
ARGON2_RUNS: Final = Counter(
    "nz_policyd_argon2_runs",
    "Argon2id verifications (each is a key-cache miss for a prefix Postgres knows).",
)
AUTH_HELD: Final = Counter(
    "nz_policyd_auth_held",
    "Repeated authentication failures whose answer was held back (held), or answered at "
    "once because the most were already waiting (overflow).",
    ["outcome"],
)
STORE_ERRORS: Final = Counter(
    "nz_policyd_store_errors",
    "Store failures seen while deciding, by store (redis, postgres) and kind (unavailable, fault).",
    ["store", "kind"],
)

_STORES: Final = ("redis", "postgres")

# Children resolved once per label combination: `labels()` costs more than `inc()`.
_decisions: dict[tuple[str, str, str], Counter] = {}
_key_cache: dict[tuple[str, str], Counter] = {}


def _decision_child(outcome: str, code: str, surface: str) -> Counter:
    key = (outcome, code, surface)
    child = _decisions.get(key)
    if child is None:
        child = _decisions[key] = DECISIONS.labels(outcome, code, surface)
    return child


def decided(code: str | None, surface: Surface | None, seconds: float) -> None:
    """One decision: admitted when `code` is None, else refused with that code."""
    outcome = ADMITTED if code is None else REFUSED
    _decision_child(outcome, code or "ok", surface or "unknown").inc()
    DECISION_SECONDS.observe(seconds)


def failed(exc: BaseException, seconds: float) -> None:
    """A decision that raised (a bug or a store fault): refused with a 500."""
    _decision_child(ERROR, "internal_error", "unknown").inc()
    DECISION_SECONDS.observe(seconds)
    store_error(exc)


def key_cache(cache: str, *, hit: bool) -> None:
    """One key-record lookup in the process cache or Redis."""
    key = (cache, "hit" if hit else "miss")
    child = _key_cache.get(key)
    if child is None:
        child = _key_cache[key] = KEY_CACHE.labels(*key)
    child.inc()


def argon2_run() -> None:
    ARGON2_RUNS.inc()


def auth_held(*, overflow: bool) -> None:
    AUTH_HELD.labels("overflow" if overflow else "held").inc()


def store_error(exc: BaseException) -> None:
    """Count a StoreUnavailable/StoreFault; their messages start with the store's name."""
    if isinstance(exc, StoreUnavailable):
        kind = "unavailable"
    elif isinstance(exc, StoreFault):
        kind = "fault"
    else:
        return
    store = str(exc).partition(":")[0]
    STORE_ERRORS.labels(store if store in _STORES else "other", kind).inc()


def exposition() -> bytes:
    """The text format of every metric of this process (or of all workers, multiprocess)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)

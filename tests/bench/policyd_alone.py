"""Scenario 3: policyd alone, `/authz` over its unix socket, cache hits and misses.

A hit is the normal case: the key's record is in policyd's process cache or in Redis.
A miss is a key policyd has never seen (made fresh for this run): Postgres plus one
Argon2id check. policyd's own `argon2_runs` counter (GET /statsz on the socket) shows
that Argon2id runs once per new key and never on the hit path.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from tests.bench.http1 import build_request, read_head
from tests.bench.load import closed_loop
from tests.bench.plan import Plan
from tests.bench.resources import CpuMeter
from tests.bench.rig import BenchRig, make_keys, make_limited_key
from tests.bench.stats import median, summary
from tests.bench.workload import Workload

__all__ = ["argon2_runs", "policyd_alone"]

# policyd answers with the body Ollama gets in a header (X-Nz-Upstream-Body): a 64 KiB
# conversation makes a reply head far larger than asyncio's default 64 KiB line limit.
_READ_LIMIT: Final = 16 * 1024 * 1024


async def _statsz(socket_path: Path) -> dict[str, Any] | None:
    reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=_READ_LIMIT)
    try:
        writer.write(build_request("GET", "/statsz", host="policyd", headers={}))
        status, body = await _read_body(reader)
    finally:
        writer.close()
    if status != 200:
        return None
    stats: dict[str, Any] = json.loads(body)
    return stats


async def _read_body(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    # /statsz is tiny and sent with a Content-Length; read_reply only counts bytes.
    status, headers = await read_head(reader)
    size = int(headers.get(b"content-length", b"0"))
    return status, await reader.readexactly(size)


def argon2_runs(rig: BenchRig) -> int | None:
    """policyd's Argon2id verification count, or None if it does not expose one."""
    stats = asyncio.run(_statsz(rig.stack.policyd_socket))
    if stats is None or not isinstance(stats.get("argon2_runs"), int):
        return None
    runs: int = stats["argon2_runs"]
    return runs


def _delta(after: int | None, before: int | None) -> int | None:
    return None if after is None or before is None else after - before


def _hits(rig: BenchRig, plan: Plan, request: Callable[[int], bytes]) -> list[dict[str, Any]]:
    """Rounds of cache hits: one at a time (latency), then N at once (rate, CPU)."""
    socket_path = str(rig.stack.policyd_socket)

    def connect() -> Any:
        return asyncio.open_unix_connection(socket_path, limit=_READ_LIMIT)

    handles = rig.handles()
    rounds: list[dict[str, Any]] = []
    for _ in range(plan.rounds):
        single = asyncio.run(
            closed_loop(connect, request, concurrency=1, duration_s=plan.policyd_s)
        )
        meter = CpuMeter({name: handles[name] for name in ("policyd", "redis")})
        meter.start()
        many = asyncio.run(
            closed_loop(
                connect, request, concurrency=plan.policyd_concurrency, duration_s=plan.policyd_s
            )
        )
        spent = meter.stop()
        rounds.append(
            {
                "cpu_ms_per_decision": {
                    name: round(seconds * 1000.0 / max(1, many.sent), 4)
                    for name, seconds in spent.items()
                },
                "sequential_latency_ms": summary(single.latencies_ms),
                "sequential_decisions_per_s": round(single.rate, 1),
                "concurrent_decisions_per_s": round(many.rate, 1),
                "concurrent_latency_ms": summary(many.latencies_ms),
                "failures": {**single.failures, **many.failures},
            }
        )
    return rounds


def _hit_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds, plus every round."""
    return {
        "sequential_latency_ms": {
            pct: median([r["sequential_latency_ms"][pct] for r in rounds])
            for pct in ("p50", "p90", "p99")
        },
        "sequential_decisions_per_s": median([r["sequential_decisions_per_s"] for r in rounds]),
        "concurrent_decisions_per_s": median([r["concurrent_decisions_per_s"] for r in rounds]),
        "concurrent_latency_ms": {
            pct: median([r["concurrent_latency_ms"][pct] for r in rounds])
            for pct in ("p50", "p90", "p99")
        },
        "cpu_ms_per_decision": {
            name: median([r["cpu_ms_per_decision"][name] for r in rounds])
            for name in ("policyd", "redis")
        },
        "decisions": sum(
            r["sequential_latency_ms"]["n"] + r["concurrent_latency_ms"]["n"] for r in rounds
        ),
        "failures": sum(sum(r["failures"].values()) for r in rounds),
        "rounds": rounds,
    }


def policyd_alone(rig: BenchRig, plan: Plan, work: Workload) -> dict[str, Any]:
    """Decisions per second and latency for hits (concurrency 1 and N) and for misses.

    Hits are measured for the benchmark's tenant, which has no limits (admission keeps
    only its budget counters), for a tenant with every limit set (all windows and
    leases), so both costs of the admission script are on record, and for a long
    conversation (~64 KiB body), where decoding and reading the body dominate.
    """
    socket_path = str(rig.stack.policyd_socket)

    def connect() -> Any:
        return asyncio.open_unix_connection(socket_path, limit=_READ_LIMIT)

    def hit(_: int) -> bytes:
        return work.authz_request()

    limited_key = make_limited_key(rig)

    def limited(_: int) -> bytes:
        return work.authz_request(key=limited_key)

    long_chat = work.long_chat()

    def long(_: int) -> bytes:
        return work.authz_request(body=long_chat)

    asyncio.run(closed_loop(connect, hit, concurrency=2, duration_s=plan.warmup_s))
    asyncio.run(closed_loop(connect, limited, concurrency=2, duration_s=plan.warmup_s))
    runs_before = argon2_runs(rig)
    hits = _hits(rig, plan, hit)
    limited_hits = _hits(rig, plan, limited)
    long_hits = _hits(rig, plan, long)
    hit_argon2 = _delta(argon2_runs(rig), runs_before)

    # Misses: keys policyd has never seen. Making them runs Argon2id in *this* process.
    fresh = make_keys(rig, names=[f"miss-{index}" for index in range(plan.miss_keys)])

    def miss(index: int) -> bytes:
        return work.authz_request(key=fresh[index])

    runs_before = argon2_runs(rig)
    misses = asyncio.run(closed_loop(connect, miss, concurrency=2, total=len(fresh)))
    miss_argon2 = _delta(argon2_runs(rig), runs_before)
    # The same keys again: now cached, so no further Argon2id.
    runs_before = argon2_runs(rig)
    again = asyncio.run(closed_loop(connect, miss, concurrency=2, total=len(fresh)))
    again_argon2 = _delta(argon2_runs(rig), runs_before)

    return {
        "concurrency": plan.policyd_concurrency,
        "hit": {**_hit_summary(hits), "argon2_runs": hit_argon2},
        "hit_limited": _hit_summary(limited_hits),
        "hit_long_chat": {**_hit_summary(long_hits), "body_bytes": len(long_chat)},
        "miss": {
            "keys": len(fresh),
            "latency_ms": summary(misses.latencies_ms),
            "decisions_per_s": round(misses.rate, 1),
            "argon2_runs": miss_argon2,
            "failures": sum(misses.failures.values()),
        },
        "miss_then_hit": {
            "latency_ms": summary(again.latencies_ms),
            "argon2_runs": again_argon2,
            "failures": sum(again.failures.values()),
        },
    }

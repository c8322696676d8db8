"""Scenario 3: policyd alone, `/authz` over its unix socket, cache hits and misses.

A hit is the normal case: the key's record is in policyd's process cache or in Redis.
A miss is a key policyd has never seen (made fresh for this run): Postgres plus one
Argon2id check. policyd's own `argon2_runs` counter (GET /statsz on the socket) shows
that Argon2id runs once per new key and never on the hit path.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from tests.bench.http1 import build_request, read_head
from tests.bench.load import closed_loop
from tests.bench.plan import Plan
from tests.bench.resources import CpuMeter
from tests.bench.rig import BenchRig, make_keys
from tests.bench.stats import median, summary
from tests.bench.workload import Workload

__all__ = ["argon2_runs", "policyd_alone"]


async def _statsz(socket_path: Path) -> dict[str, Any] | None:
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
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


def policyd_alone(rig: BenchRig, plan: Plan, work: Workload) -> dict[str, Any]:
    """Decisions per second and latency for hits (concurrency 1 and N) and for misses."""
    socket_path = str(rig.stack.policyd_socket)

    def connect() -> Any:
        return asyncio.open_unix_connection(socket_path)

    def hit(_: int) -> bytes:
        return work.authz_request()

    asyncio.run(closed_loop(connect, hit, concurrency=2, duration_s=plan.warmup_s))
    hits: list[dict[str, Any]] = []
    handles = rig.handles()
    runs_before = argon2_runs(rig)
    for _ in range(plan.rounds):
        single = asyncio.run(closed_loop(connect, hit, concurrency=1, duration_s=plan.policyd_s))
        meter = CpuMeter({name: handles[name] for name in ("policyd", "redis")})
        meter.start()
        many = asyncio.run(
            closed_loop(
                connect, hit, concurrency=plan.policyd_concurrency, duration_s=plan.policyd_s
            )
        )
        spent = meter.stop()
        hits.append(
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
        "hit": {
            "sequential_latency_ms": {
                pct: median([r["sequential_latency_ms"][pct] for r in hits])
                for pct in ("p50", "p90", "p99")
            },
            "sequential_decisions_per_s": median([r["sequential_decisions_per_s"] for r in hits]),
            "concurrent_decisions_per_s": median([r["concurrent_decisions_per_s"] for r in hits]),
            "concurrent_latency_ms": {
                pct: median([r["concurrent_latency_ms"][pct] for r in hits])
                for pct in ("p50", "p90", "p99")
            },
            "cpu_ms_per_decision": {
                name: median([r["cpu_ms_per_decision"][name] for r in hits])
                for name in ("policyd", "redis")
            },
            "argon2_runs": hit_argon2,
            "decisions": sum(
                r["sequential_latency_ms"]["n"] + r["concurrent_latency_ms"]["n"] for r in hits
            ),
            "failures": sum(sum(r["failures"].values()) for r in hits),
            "rounds": hits,
        },
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

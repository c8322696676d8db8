"""Scenarios 1 and 2: small requests and streams, each target against its baseline.

Every round runs every target once, in a rotated order, so slow drift on a shared
machine (other jobs, thermal limits) spreads over all targets instead of favouring one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from compose.local.processes import ProcessHandle
from tests.bench.load import LoadResult, open_loop, wrk_saturate
from tests.bench.plan import Plan
from tests.bench.resources import CpuMeter
from tests.bench.rig import BenchRig, Target
from tests.bench.stats import median, summary
from tests.bench.streams import StreamResult, run_streams
from tests.bench.workload import Workload

__all__ = ["Sampler", "difference", "small_requests", "streams"]

_T = TypeVar("_T")
#: Parts whose CPU each target of scenario 1 costs.
_PARTS: dict[str, tuple[str, ...]] = {
    "a_direct": ("standin",),
    "b_caddy": ("caddy-bare", "standin"),
    "b2_null_auth": ("caddy-null", "null-auth", "standin"),
    "c_gateway": ("caddy", "policyd", "redis", "postgres", "standin", "meterd"),
}
#: Something to run beside the gateway's fixed-rate load (meterd's lag sampler).
Sampler = Callable[[], Coroutine[Any, Any, None]]


def _rotated(items: Sequence[_T], by: int) -> list[_T]:
    shift = by % len(items)
    return [*items[shift:], *items[:shift]]


def _connector(target: Target) -> Callable[[], Any]:
    return lambda: asyncio.open_connection(target.host, target.port)


def difference(
    minuend: Mapping[str, Any], subtrahend: Mapping[str, Any], fields: Sequence[str]
) -> dict[str, float | None]:
    """minuend - subtrahend per field, None where either side has no value."""
    result: dict[str, float | None] = {}
    for field in fields:
        a, b = minuend.get(field), subtrahend.get(field)
        result[field] = None if a is None or b is None else round(a - b, 3)
    return result


def _cpu_per_1k(spent: Mapping[str, float], requests: int) -> dict[str, float | None]:
    if requests <= 0:
        return {name: None for name in spent}
    per: dict[str, float | None] = {
        name: round(seconds * 1000.0 / requests, 4) for name, seconds in spent.items()
    }
    per["total"] = round(sum(spent.values()) * 1000.0 / requests, 4)
    return per


def _handles_for(rig: BenchRig, target: Target) -> dict[str, ProcessHandle]:
    running = rig.handles()
    return {name: running[name] for name in _PARTS[target.name] if name in running}


async def _fixed_rate(
    target: Target, requests: list[bytes], plan: Plan, rate: float, sampler: Sampler | None
) -> LoadResult:
    side = asyncio.create_task(sampler()) if sampler is not None else None
    try:
        return await open_loop(
            _connector(target),
            lambda index: requests[index % len(requests)],
            rate=rate,
            duration_s=plan.fixed_s,
        )
    finally:
        if side is not None:
            side.cancel()
            await asyncio.gather(side, return_exceptions=True)


def _rate_key(rate: float) -> str:
    return f"{rate:g}"


def _one_target(
    rig: BenchRig,
    plan: Plan,
    work: Workload,
    target: Target,
    *,
    script: Path,
    sampler: Sampler | None,
) -> dict[str, Any]:
    """One round on one target: wrk at saturation, then each fixed rate, with CPU readings."""
    meter = CpuMeter(_handles_for(rig, target))
    meter.start()
    saturated = wrk_saturate(
        f"http://{target.host}:{target.port}",
        script=script,
        duration_s=plan.saturate_s,
        connections=plan.wrk_connections,
    )
    result: dict[str, Any] = {
        "saturation_rps": round(saturated.rate, 1),
        "saturation_errors": saturated.errors,
        "saturation_latency_ms": saturated.latency_ms,
        "saturation_cpu_s_per_1k": _cpu_per_1k(meter.stop(), saturated.requests),
        "fixed": {},
    }
    requests = work.small_requests(target)
    for rate in plan.fixed_rates:
        meter.start()
        fixed = asyncio.run(_fixed_rate(target, requests, plan, rate, sampler))
        result["fixed"][_rate_key(rate)] = {
            "latency_ms": summary(fixed.latencies_ms),
            "failures": fixed.failures,
            "max_send_lag_ms": round(fixed.max_send_lag_ms, 3),
            "cpu_s_per_1k": _cpu_per_1k(meter.stop(), fixed.sent),
        }
    return result


def small_requests(
    rig: BenchRig, plan: Plan, work: Workload, *, script: Path, sampler: Sampler | None = None
) -> dict[str, Any]:
    """Scenario 1: saturation throughput (wrk) and fixed-rate latency, a/b/c per round.

    `script` is the wrk script sending `work.small()` (see `load.wrk_script`). Latency is
    measured at every rate of `plan.fixed_rates`; the first is the headline figure.
    """
    targets = [rig.direct(), rig.caddy_only(), rig.null_auth_gateway(), rig.gateway()]
    for target in targets:
        wrk_saturate(
            f"http://{target.host}:{target.port}",
            script=script,
            duration_s=plan.warmup_s,
            connections=plan.wrk_connections,
        )
    rounds: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for number in range(plan.rounds):
        for target in _rotated(targets, number):
            side = sampler if target.name == "c_gateway" else None
            rounds[target.name].append(
                _one_target(rig, plan, work, target, script=script, sampler=side)
            )
    results = {name: _small_medians(per_round, plan) for name, per_round in rounds.items()}
    gateway, caddy = results["c_gateway"], results["b_caddy"]
    null_auth = results["b2_null_auth"]
    ratio = None
    if gateway["saturation_rps"] and caddy["saturation_rps"]:
        ratio = round(gateway["saturation_rps"] / caddy["saturation_rps"], 3)

    def added_by(upper: dict[str, Any], lower: dict[str, Any]) -> dict[str, Any]:
        return {
            rate: difference(
                upper["latency_by_rate_ms"][rate],
                lower["latency_by_rate_ms"][rate],
                ("p50", "p90", "p99"),
            )
            for rate in upper["latency_by_rate_ms"]
        }

    added = added_by(gateway, caddy)
    return {
        "fixed_rate_rps": plan.fixed_rates[0],
        "fixed_rates_rps": list(plan.fixed_rates),
        "wrk_connections": plan.wrk_connections,
        "targets": results,
        "added_latency_ms": added[_rate_key(plan.fixed_rates[0])],
        "added_latency_by_rate_ms": added,
        # The split of the addition: the auth hop by itself (b2 - b), deciding (c - b2).
        "auth_hop_floor_ms_by_rate": added_by(null_auth, caddy),
        "deciding_ms_by_rate": added_by(gateway, null_auth),
        "throughput_ratio": ratio,
    }


def _small_medians(per_round: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    def at(rate: str, name: str) -> list[Any]:
        return [r["fixed"][rate][name] for r in per_round]

    def cpu(rows: list[dict[str, float | None]]) -> dict[str, float | None]:
        return {part: median([row[part] for row in rows]) for part in rows[0]}

    by_rate = {
        rate: {
            field: median([lat[field] for lat in at(rate, "latency_ms")])
            for field in ("p50", "p90", "p99", "max", "mean")
        }
        for rate in per_round[0]["fixed"]
    }
    headline = _rate_key(plan.fixed_rates[0])
    return {
        "saturation_rps": median([r["saturation_rps"] for r in per_round]),
        "latency_ms": by_rate[headline],
        "latency_by_rate_ms": by_rate,
        "cpu_s_per_1k_requests": cpu(at(headline, "cpu_s_per_1k")),
        "saturation_cpu_s_per_1k_requests": cpu([r["saturation_cpu_s_per_1k"] for r in per_round]),
        "failures": sum(
            sum(sum(fixed["failures"].values()) for fixed in r["fixed"].values())
            + sum(r["saturation_errors"].values())
            for r in per_round
        ),
        "rounds": per_round,
    }


# --- scenario 2 ----------------------------------------------------------------------------


def _stream_round(result: StreamResult) -> dict[str, Any]:
    return {
        "ttfb_ms": summary(result.ttfb_ms),
        "ttft_ms": summary(result.ttft_ms),
        "gap_ms": summary(result.gaps_ms),
        "tokens_per_stream": median(result.tokens),
        "streams_ok": len(result.ttfb_ms),
        "failures": result.failures,
        "peak_in_flight": result.peak_in_flight,
    }


def streams(rig: BenchRig, plan: Plan, work: Workload) -> dict[str, Any]:
    """Scenario 2: TTFB, TTFT and chunk gaps of concurrent streams through (b) and (c)."""
    targets = list(rig.stream_targets())
    for target in targets:  # warm-up: connections, caches, the key's record
        asyncio.run(
            run_streams(
                _connector(target),
                work.stream_request(target, tokens=min(3, plan.stream_tokens)),
                rate=plan.stream_rate,
                count=max(2, plan.stream_count // 20),
            )
        )
    rounds: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for number in range(plan.rounds):
        for target in _rotated(targets, number):
            result = asyncio.run(
                run_streams(
                    _connector(target),
                    work.stream_request(target, tokens=plan.stream_tokens),
                    rate=plan.stream_rate,
                    count=plan.stream_count,
                )
            )
            rounds[target.name].append(_stream_round(result))
    results = {name: _stream_medians(per_round) for name, per_round in rounds.items()}
    gateway, caddy = results["c_gateway"], results["b_caddy"]
    added_ttfb = difference(gateway["ttfb_ms"], caddy["ttfb_ms"], ("p50", "p90", "p99"))
    added_ttft = difference(gateway["ttft_ms"], caddy["ttft_ms"], ("p50", "p90", "p99"))
    gap_change = difference(gateway["gap_ms"], caddy["gap_ms"], ("p50", "p90", "p99"))
    nominal = 1000.0 / plan.stream_tokens_per_s
    return {
        "tokens_per_s": plan.stream_tokens_per_s,
        "first_token_ms": plan.stream_first_token_ms,
        "stream_rate_per_s": plan.stream_rate,
        "streams_per_round": plan.stream_count,
        "nominal_gap_ms": round(nominal, 3),
        "targets": results,
        "added_ttfb_ms": added_ttfb,
        "added_ttft_ms": added_ttft,
        "gap_change_ms": gap_change,
        # The rule docs/performance.md states: median gap within 1 ms, p99 within 5 ms.
        "cadence_preserved": _cadence_preserved(gap_change),
    }


def _cadence_preserved(change: Mapping[str, float | None]) -> bool | None:
    p50, p99 = change.get("p50"), change.get("p99")
    if p50 is None or p99 is None:
        return None
    return abs(p50) <= 1.0 and abs(p99) <= 5.0


def _stream_medians(per_round: list[dict[str, Any]]) -> dict[str, Any]:
    def field(name: str) -> dict[str, float | None]:
        return {
            pct: median([r[name][pct] for r in per_round]) for pct in ("p50", "p90", "p99", "max")
        }

    return {
        "ttfb_ms": field("ttfb_ms"),
        "ttft_ms": field("ttft_ms"),
        "gap_ms": field("gap_ms"),
        "tokens_per_stream": median([r["tokens_per_stream"] for r in per_round]),
        "peak_in_flight": median([r["peak_in_flight"] for r in per_round]),
        "failures": sum(sum(r["failures"].values()) for r in per_round),
        "rounds": per_round,
    }

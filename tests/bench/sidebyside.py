"""Scenarios 6 and 7: small differences between near-identical targets, measured side by side.

A difference of a tenth of a millisecond drowns in the drift of a shared machine when
each target runs for seconds on its own. Here requests are sequential on one keep-alive
connection (no queueing, so a latency is the path's own cost), in short runs: each
block runs every (request, target) cell once, in an order rotated per block; each block
gives a p50 per cell, and a reported cost is the median over blocks of the paired
differences (with the difference of the pooled p50s beside it).

- 6. normalisation: the gateway whose policyd writes the body Ollama receives, against
  the same gateway without it (`untouched.py`), for a small chat and a 64 KiB conversation;
- 7. surfaces: small non-streamed chats on `/api/chat` and `/v1/chat/completions`
  through each hop (stand-in, Caddy, the auth hop, the gateway), to place what `/v1`
  costs beyond `/api`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Final

from compose.local.processes import ProcessHandle
from tests.bench.http1 import build_request
from tests.bench.load import LoadResult, closed_loop
from tests.bench.plan import Plan
from tests.bench.resources import CpuMeter
from tests.bench.rig import BenchRig, Target
from tests.bench.stats import median, percentile, summary
from tests.bench.workload import Workload

__all__ = ["NORMALISATION_BODIES", "normalisation", "surfaces"]

#: What scenario 6 sends, by label.
NORMALISATION_BODIES: Final = ("small_chat", "small_chat_v1", "long_chat")


#: Parts whose CPU each target of scenario 7 costs (meterd and Postgres settle afterwards).
_SURFACE_PARTS: Final = {
    "a_direct": ("standin",),
    "b_caddy": ("caddy-bare", "standin"),
    "b2_null_auth": ("caddy-null", "null-auth", "standin"),
    "c_gateway": ("caddy", "policyd", "redis", "standin", "meterd", "postgres"),
}


def _parts(running: Mapping[str, ProcessHandle], *names: str) -> dict[str, ProcessHandle]:
    return {name: running[name] for name in names if name in running}


async def _block(target: Target, request: bytes, count: int) -> LoadResult:
    return await closed_loop(
        lambda: asyncio.open_connection(target.host, target.port),
        lambda index: request,
        concurrency=1,
        total=count,
    )


def _interleaved(
    targets: Sequence[Target],
    requests: Mapping[str, Mapping[str, bytes]],
    parts: Mapping[str, Mapping[str, ProcessHandle]],
    *,
    blocks: int,
    block_size: int,
) -> dict[str, dict[str, Any]]:
    """Latencies per label and target, gathered in alternating blocks after a warm-up.

    `requests[label][target name]` is the raw request and `parts[target name]` the
    processes it runs through; returns, per label and target, the pooled summary, the
    p50 of every block, the CPU per request of each part (all blocks summed: /proc counts
    in clock ticks, too coarse for one block) and the failures.
    """
    cpu: dict[str, dict[str, dict[str, float]]] = {
        label: {t.name: {} for t in targets} for label in requests
    }
    pooled: dict[str, dict[str, list[float]]] = {
        label: {t.name: [] for t in targets} for label in requests
    }
    block_p50s: dict[str, dict[str, list[float | None]]] = {
        label: {t.name: [] for t in targets} for label in requests
    }
    failures: dict[str, dict[str, int]] = {
        label: {t.name: 0 for t in targets} for label in requests
    }
    # Every (request, target) cell runs once per block, in an order rotated per block, so
    # both the targets and the requests compared see the same drift.
    cells = [(label, target) for label in requests for target in targets]
    for label, target in cells:  # warm-up: connections, caches, the key's record
        asyncio.run(_block(target, requests[label][target.name], max(2, block_size // 5)))
    for number in range(blocks):
        shift = number % len(cells)
        for label, target in [*cells[shift:], *cells[:shift]]:
            meter = CpuMeter(parts[target.name])
            meter.start()
            result = asyncio.run(_block(target, requests[label][target.name], block_size))
            for part, seconds in meter.stop().items():
                spent = cpu[label][target.name]
                spent[part] = spent.get(part, 0.0) + seconds
            pooled[label][target.name].extend(result.latencies_ms)
            block_p50s[label][target.name].append(percentile(result.latencies_ms, 50))
            failures[label][target.name] += sum(result.failures.values())
    return {
        label: {
            name: {
                "latency_ms": summary(pooled[label][name]),
                "block_p50_ms": [
                    None if v is None else round(v, 3) for v in block_p50s[label][name]
                ],
                "cpu_us_per_request": {
                    part: round(seconds * 1e6 / max(1, blocks * block_size))
                    for part, seconds in cpu[label][name].items()
                },
                "failures": failures[label][name],
            }
            for name in pooled[label]
        }
        for label in requests
    }


def _minus(high: float | None, low: float | None) -> float | None:
    return None if high is None or low is None else round(high - low, 3)


def _added_p50(results: Mapping[str, Any], upper: str, lower: str) -> dict[str, float | None]:
    """upper - lower at p50: paired over blocks (the headline) and from the pooled samples."""
    pairs = [
        None if a is None or b is None else a - b
        for a, b in zip(results[upper]["block_p50_ms"], results[lower]["block_p50_ms"], strict=True)
    ]
    return {
        "p50_paired": median(pairs),
        "p50_pooled": _minus(
            results[upper]["latency_ms"]["p50"], results[lower]["latency_ms"]["p50"]
        ),
    }


def _raw(target: Target, work: Workload, path: str, body: bytes) -> bytes:
    host = f"{target.host}:{target.port}"
    return build_request("POST", path, host=host, headers=work.headers, body=body)


def normalisation(rig: BenchRig, plan: Plan, work: Workload) -> dict[str, Any]:
    """Scenario 6: what writing the upstream body adds, per body, against the same gateway
    without it (both in front of the fast stand-in, neither read by meterd)."""
    untouched, normalised = rig.normalisation_targets()
    bodies = {
        "small_chat": ("/api/chat", work.native),
        "small_chat_v1": ("/v1/chat/completions", work.openai),
        # Non-streamed with a small reply, like the small chats: the body is what differs.
        "long_chat": ("/api/chat", work.long_chat(stream=False, reply_tokens=8)),
    }
    requests = {
        label: {t.name: _raw(t, work, path, body) for t in (untouched, normalised)}
        for label, (path, body) in bodies.items()
    }
    running = rig.handles()
    parts = {
        untouched.name: _parts(running, "caddy-untouched", "policyd-untouched", "standin"),
        normalised.name: _parts(running, "caddy-normalised", "policyd", "standin"),
    }
    results = _interleaved(
        [untouched, normalised],
        requests,
        parts,
        blocks=plan.sequential_blocks,
        block_size=plan.sequential_block_size,
    )
    return {
        "block_size": plan.sequential_block_size,
        "blocks": plan.sequential_blocks,
        "body_bytes": {label: len(body) for label, (_, body) in bodies.items()},
        "targets": results,
        "added_ms": {
            label: _added_p50(results[label], normalised.name, untouched.name) for label in results
        },
    }


def surfaces(rig: BenchRig, plan: Plan, work: Workload) -> dict[str, Any]:
    """Scenario 7: `/api/chat` and `/v1/chat/completions` through every hop, sequentially."""
    targets = [rig.direct(), rig.caddy_only(), rig.null_auth_gateway(), rig.gateway()]
    requests = {
        "api_chat": {t.name: _raw(t, work, "/api/chat", work.native) for t in targets},
        "v1_chat": {t.name: _raw(t, work, "/v1/chat/completions", work.openai) for t in targets},
    }
    running = rig.handles()
    parts = {name: _parts(running, *names) for name, names in _SURFACE_PARTS.items()}
    results = _interleaved(
        targets,
        requests,
        parts,
        blocks=plan.sequential_blocks,
        block_size=plan.sequential_block_size,
    )
    direct = targets[0].name
    added = {
        label: {t.name: _added_p50(results[label], t.name, direct) for t in targets[1:]}
        for label in results
    }
    # What /v1 costs beyond /api at each target, and how much of it the gateway adds.
    v1_extra = {
        t.name: {
            kind: _minus(added["v1_chat"][t.name][kind], added["api_chat"][t.name][kind])
            for kind in ("p50_paired", "p50_pooled")
        }
        for t in targets[1:]
    }
    return {
        "block_size": plan.sequential_block_size,
        "blocks": plan.sequential_blocks,
        "targets": results,
        "added_over_direct_ms": added,
        "v1_minus_api_added_ms": v1_extra,
    }

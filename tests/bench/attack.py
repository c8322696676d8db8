"""Scenario 6: valid traffic next to unauthenticated attackers (issue 13).

The valid key's small requests run open loop at a fixed rate twice: alone, then beside
the attackers of `attackers.py` (their own process):
- `junk_clients` closed-loop clients posting ~8 MiB of `{}` with a well-formed wrong key,
- wrong secrets at `wrong_per_s` for the prefix of a known but never-used key (the
  Argon2id weapon: each new secret would cost a hash without the failure budget),
- `slow_clients` connections sending headers, then one body byte every `slow_gap_s`.
Each phase also times the first request of a few fresh keys (an Argon2id verification
in the clean lane) and reads the CPU each part spent. The report gives the valid
traffic's p50/p99 in both phases (medians over `plan.rounds` rounds, each with its own
fresh keys and victim), the attackers' answers and the Argon2id runs (the most in one
round).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

from compose.local.services import REPO_ROOT
from tests.bench.attackers import JUNK_BYTES
from tests.bench.http1 import build_request, read_reply
from tests.bench.load import LoadResult, open_loop
from tests.bench.plan import Plan
from tests.bench.policyd_alone import argon2_runs
from tests.bench.resources import CpuMeter
from tests.bench.rig import BenchRig, Target, make_keys
from tests.bench.stats import median_of, summary
from tests.bench.workload import Workload

__all__ = ["under_attack"]


async def _connect(target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(target.host, target.port)


async def _first_uses(target: Target, work: Workload, keys: list[str]) -> list[float]:
    """Latency (ms) of each fresh key's first request, one after another."""
    host = f"{target.host}:{target.port}"
    took = []
    for key in keys:
        headers = {**work.headers, "Authorization": f"Bearer {key}"}
        request = build_request("POST", "/api/chat", host=host, headers=headers, body=work.native)
        started = time.monotonic()
        reader, writer = await _connect(target)
        try:
            writer.write(request)
            reply = await read_reply(reader)
        finally:
            writer.close()
        if 200 <= reply.status < 300:
            took.append((time.monotonic() - started) * 1000.0)
    return took


async def _valid_traffic(
    target: Target, plan: Plan, work: Workload, fresh: list[str]
) -> tuple[LoadResult, list[float]]:
    requests = work.small_requests(target)

    async def load(duration_s: float) -> LoadResult:
        return await open_loop(
            lambda: _connect(target),
            lambda index: requests[index % len(requests)],
            rate=plan.attack_valid_rate,
            duration_s=duration_s,
        )

    await load(plan.warmup_s)  # connections open, caches warm; not measured
    measured = await load(plan.attack_s)
    return measured, await _first_uses(target, work, fresh)


@contextlib.contextmanager
def _attackers(options: dict[str, Any], outcomes: dict[str, Any]) -> Iterator[None]:
    """The attack process, running for the duration of the block; fills `outcomes`."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.attackers", json.dumps(options)],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    try:
        if process.stdout.readline().strip() != "started":
            raise RuntimeError("the attack process did not start")
        yield
    finally:
        try:
            stdout, _ = process.communicate("stop\n", timeout=120)
            outcomes.update(json.loads(stdout.strip().splitlines()[-1]))
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            process.kill()
            process.wait()
            raise


def _phase(rig: BenchRig, plan: Plan, work: Workload, fresh: list[str]) -> dict[str, Any]:
    meter = CpuMeter(rig.handles())
    meter.start()
    load, first = asyncio.run(_valid_traffic(rig.gateway(), plan, work, fresh))
    return {
        "sent": load.sent,
        "failures": sum(load.failures.values()),
        "failure_kinds": load.failures,
        "latency_ms": summary(load.latencies_ms),
        "first_use_ms": summary(first),
        "cpu_s": {name: round(spent, 2) for name, spent in meter.stop().items()},
    }


def _round(rig: BenchRig, plan: Plan, work: Workload) -> dict[str, Any]:
    """Valid traffic alone, then beside the attack (fresh keys and a fresh victim)."""
    target = rig.gateway()
    half = plan.attack_first_uses
    run = uuid.uuid4().hex[:8]  # key names are unique per tenant
    fresh = make_keys(rig, names=[f"fresh-{run}-{i}" for i in range(2 * half)])
    (victim,) = make_keys(rig, names=[f"victim-{run}"])  # known, never used: never cached
    options = {
        "host": target.host,
        "port": target.port,
        "junk_clients": plan.attack_junk_clients,
        "victim_prefix": victim.rsplit("_", 1)[0],
        "wrong_per_s": plan.attack_wrong_per_s,
        "slow_clients": plan.attack_slow_clients,
        "slow_gap_s": plan.attack_slow_gap_s,
    }
    baseline = _phase(rig, plan, work, fresh[:half])
    outcomes: dict[str, Any] = {}
    runs_before = argon2_runs(rig)
    with _attackers(options, outcomes):
        attacked = _phase(rig, plan, work, fresh[half:])
    runs_after = argon2_runs(rig)
    return {
        "baseline": baseline,
        "under_attack": attacked,
        "attack_outcomes": outcomes,
        # Includes the fresh keys' own first-use verifications (one each).
        "argon2_runs_during_attack": (
            None if runs_before is None or runs_after is None else runs_after - runs_before
        ),
    }


def _median_phase(phases: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "failures": sum(phase["failures"] for phase in phases),
        "latency_ms": median_of([phase["latency_ms"] for phase in phases]),
        "first_use_ms": median_of([phase["first_use_ms"] for phase in phases]),
    }


def _summed(outcomes: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    total: dict[str, dict[str, int]] = {}
    for one in outcomes:
        for attacker, counts in one.items():
            into = total.setdefault(attacker, {})
            for outcome, count in counts.items():
                into[outcome] = into.get(outcome, 0) + count
    return total


def under_attack(rig: BenchRig, plan: Plan, work: Workload) -> dict[str, Any]:
    """`plan.rounds` rounds of: valid traffic alone, then beside the attack; medians."""
    rounds = [_round(rig, plan, work) for _ in range(plan.rounds)]
    baseline = _median_phase([r["baseline"] for r in rounds])
    attacked = _median_phase([r["under_attack"] for r in rounds])
    p99_calm, p99_attack = baseline["latency_ms"]["p99"], attacked["latency_ms"]["p99"]
    return {
        "valid_rate": plan.attack_valid_rate,
        "attack": {
            "junk_clients": plan.attack_junk_clients,
            "junk_body_bytes": JUNK_BYTES,
            "wrong_secrets_per_s": plan.attack_wrong_per_s,
            "slow_clients": plan.attack_slow_clients,
            "slow_byte_every_s": plan.attack_slow_gap_s,
        },
        "baseline": baseline,
        "under_attack": attacked,
        "p99_ratio": (
            round(p99_attack / p99_calm, 2) if p99_calm and p99_attack is not None else None
        ),
        "attack_outcomes": _summed([r["attack_outcomes"] for r in rounds]),
        "argon2_runs_during_attack": max(
            (r["argon2_runs_during_attack"] or 0 for r in rounds), default=None
        ),
        "rounds": rounds,
    }

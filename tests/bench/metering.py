"""Scenario 4: how fast meterd settles the access log, and how far behind it runs.

Throughput: meterd is stopped, the gateway is driven at saturation so Caddy writes a
backlog of real access-log lines, then meterd is started and timed from its first
checkpoint advance until the checkpoint reaches the end of the file. The stored
checkpoint trails one batch (see meterd/settle.py), so the first batch and meterd's
start-up are outside the timed span; lines are counted over the same span.
Lag: while scenario 1 drives the gateway at its fixed rate, the checkpoint's
`last_event_at` (the start time of the last settled request) is sampled against now.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Final

import asyncpg  # type: ignore[import-untyped]
import attrs

from tests.bench.load import wrk_saturate
from tests.bench.plan import Plan
from tests.bench.rig import BenchRig
from tests.bench.stats import summary

__all__ = ["LagSamples", "meterd_throughput"]

_QUERY: Final = (
    "SELECT byte_offset, lines, extract(epoch FROM last_event_at) AS last_event "
    "FROM meter_checkpoints WHERE log_path = $1 ORDER BY updated_at DESC LIMIT 1"
)
_POLL_S: Final = 0.05
_SAMPLE_S: Final = 0.25
_SETTLE_TIMEOUT_S: Final = 120.0
NOT_IN_STACK: Final = "meterd is not part of compose/local/parts.py yet; nothing measured"


@attrs.frozen
class _Checkpoint:
    byte_offset: int
    lines: int
    last_event: float | None


async def _checkpoint(conn: Any, log_path: Path) -> _Checkpoint | None:
    row = await conn.fetchrow(_QUERY, str(log_path))
    if row is None:
        return None
    last = row["last_event"]
    return _Checkpoint(int(row["byte_offset"]), int(row["lines"]), float(last) if last else None)


class LagSamples:
    """Samples meterd's lag behind now while the gateway is under load (scenario 1)."""

    def __init__(self, rig: BenchRig) -> None:
        self._dsn = rig.stack.postgres.launcher.dsn
        self._log = rig.stack.access_log
        self.lag_s: list[float] = []
        self.backlog_bytes: list[int] = []

    async def sample(self) -> None:
        """Run until cancelled, appending one sample every quarter second."""
        conn = await asyncpg.connect(self._dsn)
        try:
            while True:
                await asyncio.sleep(_SAMPLE_S)
                point = await _checkpoint(conn, self._log)
                if point is None or point.last_event is None:
                    continue
                self.lag_s.append(max(0.0, time.time() - point.last_event))
                self.backlog_bytes.append(max(0, _size(self._log) - point.byte_offset))
        finally:
            await conn.close()

    def report(self) -> dict[str, Any]:
        lag = summary(self.lag_s)
        return {
            "samples": lag["n"],
            "lag_s": {pct: lag[pct] for pct in ("p50", "p99", "max")},
            "backlog_bytes_max": max(self.backlog_bytes) if self.backlog_bytes else None,
        }


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _lines_between(path: Path, start: int) -> int:
    with path.open("rb") as log:
        log.seek(start)
        return sum(chunk.count(b"\n") for chunk in iter(lambda: log.read(1 << 20), b""))


async def _stored_checkpoint(rig: BenchRig) -> _Checkpoint | None:
    conn = await asyncpg.connect(rig.stack.postgres.launcher.dsn)
    try:
        return await _checkpoint(conn, rig.stack.access_log)
    finally:
        await conn.close()


async def _time_settling(
    rig: BenchRig, *, before: _Checkpoint | None, end: int, started: float
) -> dict[str, Any]:
    conn = await asyncpg.connect(rig.stack.postgres.launcher.dsn)
    try:
        first: tuple[float, _Checkpoint] | None = None
        while time.monotonic() - started < _SETTLE_TIMEOUT_S:
            point = await _checkpoint(conn, rig.stack.access_log)
            now = time.monotonic()
            if point is not None:
                if first is None and (before is None or point.byte_offset > before.byte_offset):
                    first = (now, point)
                if point.byte_offset >= end and first is not None:
                    elapsed = now - first[0]
                    settled = point.lines - first[1].lines
                    timed = settled > 0 and elapsed > 0
                    return {
                        "reached_end": True,
                        "lines_settled": settled,
                        "seconds": round(elapsed, 3),
                        # A backlog settled in one or two batches leaves nothing to time.
                        "lines_per_s": round(settled / elapsed, 1) if timed else None,
                        "first_advance_s": round(first[0] - started, 3),
                    }
            await asyncio.sleep(_POLL_S)
    finally:
        await conn.close()
    return {"reached_end": False, "lines_settled": None, "seconds": None, "lines_per_s": None}


def meterd_throughput(rig: BenchRig, plan: Plan, *, script: Path) -> dict[str, Any]:
    """Stop meterd, write a backlog through the gateway, restart it and time the catch-up."""
    meterd = dict(rig.stack.parts()).get("meterd")
    if meterd is None:
        return {"lines_per_s": None, "note": NOT_IN_STACK}
    log = rig.stack.access_log
    meterd.stop()
    start = _size(log)
    target = rig.gateway()
    wrk_saturate(
        f"http://{target.host}:{target.port}",
        script=script,
        duration_s=plan.meterd_backlog_s,
        connections=plan.wrk_connections,
    )
    # Caddy logs a request when its reply is done: let the last ones land first.
    time.sleep(0.5)
    end = _size(log)
    backlog = _lines_between(log, start)
    before = asyncio.run(_stored_checkpoint(rig))
    started = time.monotonic()
    meterd.start()
    timing = asyncio.run(_time_settling(rig, before=before, end=end, started=started))
    return {"backlog_lines": backlog, **timing}

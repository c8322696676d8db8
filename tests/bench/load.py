"""Load generators: open loop at a fixed rate, closed loop, and wrk for saturation.

The open-loop generator sends request *i* at `start + i / rate` whatever happened to the
earlier ones, and measures each latency from that scheduled time, so a server that
stalls is charged for the requests queued behind the stall (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import collections
import json
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Final

import attrs

from tests.bench.http1 import read_reply

__all__ = [
    "LoadResult",
    "WrkResult",
    "closed_loop",
    "is_success",
    "open_loop",
    "wrk_binary",
    "wrk_saturate",
    "wrk_script",
]

#: Refuse to open more connections than this; a stalled server then shows as queueing.
_MAX_CONNECTIONS: Final = 512
_WRK_MARKER: Final = "NZ-BENCH-JSON "
_APT_HINT: Final = "apt-get install -y wrk"

Connector = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
RequestSource = Callable[[int], bytes]


@attrs.frozen(kw_only=True)
class LoadResult:
    """What one load run saw: latencies of successes (ms), failures by kind, and pace."""

    latencies_ms: list[float]
    sent: int
    failures: dict[str, int]
    elapsed_s: float
    #: How far behind schedule the generator itself fell at worst (ms); large = client-bound.
    max_send_lag_ms: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    @property
    def rate(self) -> float:
        """Completed successes per second."""
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0


class _Pool:
    """Keep-alive connections: reuse an idle one, else open a new one (bounded)."""

    def __init__(self, connect: Connector) -> None:
        self._connect = connect
        self._idle: collections.deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            collections.deque()
        )
        self._slots = asyncio.Semaphore(_MAX_CONNECTIONS)
        self._open: set[asyncio.StreamWriter] = set()

    async def exchange(self, request: bytes) -> int:
        """Send one request and read its reply; returns the status."""
        async with self._slots:
            if self._idle:
                reader, writer = self._idle.pop()
            else:
                reader, writer = await self._connect()
                self._open.add(writer)
            try:
                writer.write(request)
                reply = await read_reply(reader)
            except BaseException:
                self._discard(writer)
                raise
            if reply.keep_alive:
                self._idle.append((reader, writer))
            else:
                self._discard(writer)
            return reply.status

    def _discard(self, writer: asyncio.StreamWriter) -> None:
        self._open.discard(writer)
        writer.close()

    async def close(self) -> None:
        for writer in list(self._open):
            self._discard(writer)
        self._idle.clear()


def is_success(status: int) -> bool:
    """The default test of a reply: any 2xx."""
    return 200 <= status < 300


def _failure(failures: dict[str, int], kind: str) -> None:
    failures[kind] = failures.get(kind, 0) + 1


async def open_loop(
    connect: Connector,
    request_for: RequestSource,
    *,
    rate: float,
    duration_s: float,
    timeout_s: float = 10.0,
) -> LoadResult:
    """Send `rate` requests per second for `duration_s`, each at its scheduled time."""
    pool = _Pool(connect)
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    failures: dict[str, int] = {}
    count = max(1, round(rate * duration_s))
    max_lag = 0.0

    async def one(index: int, scheduled: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                status = await pool.exchange(request_for(index))
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            _failure(failures, type(exc).__name__)
            return
        if 200 <= status < 300:
            latencies.append((loop.time() - scheduled) * 1000.0)
        else:
            _failure(failures, f"http_{status}")

    tasks: list[asyncio.Task[None]] = []
    start = loop.time() + 0.05
    for index in range(count):
        scheduled = start + index / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            max_lag = max(max_lag, -delay * 1000.0)
        tasks.append(asyncio.create_task(one(index, scheduled)))
    await asyncio.gather(*tasks)
    elapsed = loop.time() - start
    await pool.close()
    return LoadResult(
        latencies_ms=latencies,
        sent=count,
        failures=failures,
        elapsed_s=elapsed,
        max_send_lag_ms=max_lag,
    )


async def closed_loop(
    connect: Connector,
    request_for: RequestSource,
    *,
    concurrency: int,
    duration_s: float | None = None,
    total: int | None = None,
    timeout_s: float = 10.0,
    accept: Callable[[int], bool] = is_success,
) -> LoadResult:
    """`concurrency` workers each send the next request when the last one is answered.

    Stops after `duration_s`, or once `total` requests were sent (whichever is given).
    """
    if (duration_s is None) == (total is None):
        raise ValueError("give exactly one of duration_s and total")
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    failures: dict[str, int] = {}
    counter = 0
    start = loop.time()
    deadline = start + duration_s if duration_s is not None else float("inf")

    def claim() -> int | None:
        nonlocal counter
        if loop.time() >= deadline or (total is not None and counter >= total):
            return None
        counter += 1
        return counter - 1

    async def worker() -> None:
        reader, writer = await connect()
        try:
            while (index := claim()) is not None:
                began = loop.time()
                try:
                    async with asyncio.timeout(timeout_s):
                        writer.write(request_for(index))
                        reply = await read_reply(reader)
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                    _failure(failures, type(exc).__name__)
                    return
                if accept(reply.status):
                    latencies.append((loop.time() - began) * 1000.0)
                else:
                    _failure(failures, f"http_{reply.status}")
                if not reply.keep_alive:
                    writer.close()
                    reader, writer = await connect()
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LoadResult(
        latencies_ms=latencies, sent=counter, failures=failures, elapsed_s=loop.time() - start
    )


# --- wrk ---------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class WrkResult:
    """wrk's own summary: completed requests, errors and its (closed-loop) latencies."""

    requests: int
    duration_s: float
    errors: dict[str, int]
    latency_ms: dict[str, float]

    @property
    def rate(self) -> float:
        """Requests answered per second, failures not counted."""
        failed = sum(self.errors.values())
        return (self.requests - failed) / self.duration_s if self.duration_s > 0 else 0.0


def wrk_binary() -> Path:
    """The wrk executable from Debian's package."""
    found = shutil.which("wrk")
    if found is None:
        raise FileNotFoundError(f"wrk not found; install it with: {_APT_HINT}")
    return Path(found)


def _lua_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid Lua string literal here


def wrk_script(requests: Sequence[tuple[str, str, bytes]], *, headers: dict[str, str]) -> str:
    """A wrk Lua script cycling through (method, path, body) and reporting JSON at the end."""
    header_lines = "\n".join(
        f"  wrk.headers[{_lua_string(name)}] = {_lua_string(value)}"
        for name, value in headers.items()
    )
    formats = "\n".join(
        f"  requests[{i + 1}] = wrk.format({_lua_string(method)}, {_lua_string(path)}, "
        f"nil, {_lua_string(body.decode())})"
        for i, (method, path, body) in enumerate(requests)
    )
    return f"""-- Generated by tests/bench: cycle through the requests, report JSON.
local requests = {{}}
local index = 0

function init(args)
{header_lines}
{formats}
end

function request()
  index = index % #requests + 1
  return requests[index]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    '{_WRK_MARKER}{{"requests":%d,"duration_us":%d,'
      .. '"errors":{{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}},'
      .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
"""


def wrk_saturate(
    url: str, *, script: Path, duration_s: float, connections: int, threads: int = 1
) -> WrkResult:
    """Run wrk closed-loop against `url` and parse the script's JSON summary."""
    argv = [
        str(wrk_binary()),
        "-t", str(threads),
        "-c", str(connections),
        "-d", f"{max(1, round(duration_s))}s",
        "--timeout", "10s",
        "-s", str(script),
        url,
    ]  # fmt: skip
    began = time.monotonic()
    done = subprocess.run(
        argv, capture_output=True, text=True, check=False, timeout=duration_s + 60
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    for line in done.stdout.splitlines():
        if line.startswith(_WRK_MARKER):
            data = json.loads(line[len(_WRK_MARKER) :])
            break
    else:
        raise RuntimeError(f"wrk printed no summary after {time.monotonic() - began:.1f}s")
    errors = {name: int(count) for name, count in data["errors"].items() if count}
    return WrkResult(
        requests=int(data["requests"]),
        duration_s=int(data["duration_us"]) / 1e6,
        errors=errors,
        latency_ms={
            "p50": data["p50_us"] / 1000.0,
            "p90": data["p90_us"] / 1000.0,
            "p99": data["p99_us"] / 1000.0,
            "mean": data["mean_us"] / 1000.0,
        },
    )

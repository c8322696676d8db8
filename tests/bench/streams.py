"""Streaming client: many concurrent token streams, timed chunk by chunk.

Streams start on an open-loop schedule (a fixed arrival rate), so the number in flight
settles at rate x stream length without a synchronised burst. For each stream we keep
the time to the first response byte (TTFB, from the scheduled start), the time to the
first token line, and the gaps between successive token lines as the client sees them.
"""

from __future__ import annotations

import asyncio
import itertools

import attrs

from tests.bench.http1 import read_chunk, read_head
from tests.bench.load import Connector

__all__ = ["StreamResult", "run_streams"]


@attrs.frozen(kw_only=True)
class StreamResult:
    """All streams of one run: per-stream TTFB/TTFT, all chunk gaps, failures, peak."""

    ttfb_ms: list[float]
    ttft_ms: list[float]
    gaps_ms: list[float]
    tokens: list[int]
    failures: dict[str, int]
    peak_in_flight: int


async def _one_stream(
    connect: Connector, request: bytes, scheduled: float, loop: asyncio.AbstractEventLoop
) -> tuple[float, float, list[float], int]:
    reader, writer = await connect()
    try:
        writer.write(request)
        status, headers = await read_head(reader)
        ttfb = loop.time() - scheduled
        if status != 200:
            raise _HttpStatusError(status)
        if headers.get(b"transfer-encoding", b"").lower() != b"chunked":
            raise _HttpStatusError(0)
        arrivals: list[float] = []
        pending = b""
        while chunk := await read_chunk(reader):
            now = loop.time()
            pending += chunk
            # One NDJSON line per token; lines arriving in one read share a time.
            *lines, pending = pending.split(b"\n")
            arrivals.extend(now for line in lines if line)
        # The last line is the final `done` record, written right after the last token.
        token_arrivals = arrivals[:-1]
        if not token_arrivals:
            raise _HttpStatusError(-1)
        ttft = token_arrivals[0] - scheduled
        gaps = [(b - a) * 1000.0 for a, b in itertools.pairwise(token_arrivals)]
        return ttfb * 1000.0, ttft * 1000.0, gaps, len(token_arrivals)
    finally:
        writer.close()


class _HttpStatusError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


async def run_streams(
    connect: Connector,
    request: bytes,
    *,
    rate: float,
    count: int,
    timeout_s: float = 60.0,
) -> StreamResult:
    """Start `count` streams at `rate` per second, each on its own connection."""
    loop = asyncio.get_running_loop()
    ttfb: list[float] = []
    ttft: list[float] = []
    gaps: list[float] = []
    tokens: list[int] = []
    failures: dict[str, int] = {}
    in_flight = peak = 0

    async def one(scheduled: float) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            async with asyncio.timeout(timeout_s):
                first, first_token, stream_gaps, n = await _one_stream(
                    connect, request, scheduled, loop
                )
        except _HttpStatusError as exc:
            kind = f"http_{exc.status}"
            failures[kind] = failures.get(kind, 0) + 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            kind = type(exc).__name__
            failures[kind] = failures.get(kind, 0) + 1
        else:
            ttfb.append(first)
            ttft.append(first_token)
            gaps.extend(stream_gaps)
            tokens.append(n)
        finally:
            in_flight -= 1

    tasks: list[asyncio.Task[None]] = []
    start = loop.time() + 0.05
    for index in range(count):
        scheduled = start + index / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    return StreamResult(
        ttfb_ms=ttfb,
        ttft_ms=ttft,
        gaps_ms=gaps,
        tokens=tokens,
        failures=failures,
        peak_in_flight=peak,
    )

"""The meter loop: tail -> parse -> measure -> settle, in batches, until SIGTERM.

- A batch is whatever complete lines the log has, up to NZ_METERD_BATCH_LINES: under
  load batches fill up (and the next one is read and parsed while one is written);
  once caught up, what arrives gathers for a poll interval and is settled as one batch.
- A Postgres or Redis outage pauses settlement: the same batch is retried with
  backoff, the checkpoint stays where it is, the heartbeat says "retrying", and the
  lag grows until the store is back. Anything else is a bug and stops the daemon
  loudly (its supervisor restarts it at the checkpoint).
- Bad lines are counted and logged once, with their file and offset, never their text
  (a line may hold a prompt); the checkpoint moves past them. Rows Postgres refuses for
  what they hold are quarantined (settle.py) and never stop settlement.
- A second follower of the same log releases concurrency leases as lines arrive
  (leases.py), whatever Postgres does; it starts at settlement's checkpoint, or at the
  log's end if there is none within a few seconds.
- SIGTERM: stop taking new work once the log read at that moment is settled (for at
  most NZ_METERD_DRAIN_S), commit, exit 0.
- Every NZ_METERD_SWEEP_EVERY_S, once the tail has caught up, reservations whose log
  line never arrived are charged as reserved and flagged (sweep.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, TypeVar

import asyncpg  # type: ignore[import-untyped]
import redis.asyncio as aioredis

from meterd import health, metrics
from meterd.db import create_pool, is_pg_outage
from meterd.leases import release_calls
from meterd.parse import BadLine, Event, parse_line
from meterd.records import Batch, Record
from meterd.settings import Settings
from meterd.settle import Store
from meterd.settle_script import SettleScript
from meterd.sweep import Sweeper, hold_off_s
from meterd.tail import Checkpoint, FileId, Follower, Line, start_of
from meterd.usage import Calibration, measure
from policyd.shared import contract
from policyd.shared.errors import is_redis_outage
from policyd.shared.sentinel import primary_locator, redis_client

__all__ = ["Daemon", "is_outage", "run"]

_log: Final = logging.getLogger(__name__)
_T = TypeVar("_T")

_FIRST_BACKOFF_S: Final = 0.5
_RELOAD_CALIBRATION_S: Final = 600.0
_REDIS_TIMEOUT_S: Final = 5.0
_CANCEL_AGAIN_S: Final = 0.1
_CLOSE_S: Final = 5.0
#: The exit code of a configuration meterd cannot run with (as in __main__).
_EXIT_CONFIG: Final = 2
#: How long the lease follower waits for settlement's checkpoint before starting alone.
_LEASE_START_WAIT_S: Final = 3.0
#: Lines parsed between two looks at the settlement running meanwhile (`_read_ahead`).
_PARSE_SLICE: Final = 50


def _end_of(path: Path) -> Checkpoint | None:
    """The position at the current end of the live log (None if there is none yet)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return Checkpoint(
        file=FileId.of(st),
        offset=st.st_size,
        fingerprint=hashlib.sha256(b"").digest(),
        fingerprint_len=0,
    )


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` is Postgres or Redis being unavailable (retry) rather than a bug."""
    # Redis's classification is policyd's too (policyd.shared.errors); Postgres's is
    # asyncpg's own (db.py).
    return is_redis_outage(exc) or is_pg_outage(exc)


#: Lines read ahead, with what parse_line made of each.
_Ahead = tuple[list[Line], list[Event | BadLine]]


class _Stopped(Exception):
    """SIGTERM arrived and the drain time is over."""


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait for it to end.

    Python 3.11's `asyncio.wait_for` (redis-py writes through it) loses a cancellation
    that arrives just as the awaited write completes, and the task carries on; so the
    cancellation is repeated until the task has ended.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_CANCEL_AGAIN_S)
    with contextlib.suppress(asyncio.CancelledError, _Stopped):
        task.result()


class Daemon:
    """One node's meter: owns the follower, the calibration and the counters."""

    def __init__(
        self,
        settings: Settings,
        *,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        script: SettleScript,
        release: SettleScript,
    ) -> None:
        self.settings: Final = settings
        self._redis = redis
        self._release = release
        # Where settlement starts, once loaded: the lease follower starts there too.
        self._start: asyncio.Future[Checkpoint | None] = asyncio.get_running_loop().create_future()
        self._store = Store(
            pool,
            script,
            node=settings.node,
            log_path=settings.access_log,
            prompt_retention_days=settings.prompt_retention_days,
            max_prompt_bytes=settings.max_prompt_bytes,
        )
        self._sweeper = Sweeper(
            pool, redis, script, node=settings.node, grace_s=settings.sweep_grace_s
        )
        self._calibration = Calibration()
        # Set once the tail has read everything there was: only then can a missing line
        # be told from one this node has not read yet.
        self._caught_up = asyncio.Event()
        self._stop = asyncio.Event()
        self._drain_deadline: float | None = None
        self._state = "ok"
        self._lag_bytes = 0
        self._last_started: float | None = None
        self._lines = 0
        self._bad_lines = 0
        self._settled = 0
        self._swept = 0
        metrics.watch(
            lag_seconds=lambda: self.beat().lag_seconds,
            lag_bytes=lambda: self._lag_bytes,
            retrying=lambda: self._state == "retrying",
        )

    # --- lifecycle ------------------------------------------------------------------------

    def request_stop(self) -> None:
        """SIGTERM: settle what the log holds now, then stop."""
        if not self._stop.is_set():
            _log.info("stop requested: draining for at most %gs", self.settings.drain_s)
            self._drain_deadline = time.monotonic() + self.settings.drain_s
            self._state = "draining"
            self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        metering = asyncio.create_task(self._meter(), name="meter")
        background = {
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._prune_loop(), name="prune"),
            asyncio.create_task(self._sweep_loop(), name="sweep"),
            asyncio.create_task(self._lease_loop(), name="leases"),
        }
        try:
            await asyncio.wait({metering, *background}, return_when=asyncio.FIRST_COMPLETED)
            if not metering.done():
                # A background loop ended: only a bug does that. Stop loudly.
                metering.cancel()
                for task in background:
                    if task.done():
                        task.result()
            try:
                metering.result()
            except _Stopped:
                _log.warning("stopped before the backlog was settled; it is settled next start")
        finally:
            for task in (metering, *background):
                await _cancel(task)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        _log.info(
            "stopped: %d lines, %d settled, %d bad, %d swept",
            self._lines,
            self._settled,
            self._bad_lines,
            self._swept,
        )
        return 0

    async def _meter(self) -> None:
        resume = await self._retry("load the checkpoint", self._store.load_checkpoint)
        self._start.set_result(resume)
        rows = await self._retry("load the calibration", self._store.load_calibration)
        self._calibration.replace(rows)
        follower = Follower(
            self.settings.access_log, start=resume, max_line_bytes=self.settings.max_line_bytes
        )
        # After the last batch whose Redis step is done, not yet stored (see settle.py).
        unstored: Checkpoint | None = None
        # The last batch was full: meterd is working through a backlog.
        backlog = False
        reloaded = time.monotonic()
        # Lines read, and parsed, while the previous batch was being written.
        ahead: _Ahead | None = None
        try:
            while True:
                if ahead is None:
                    # Read in the loop's thread: a few syscalls on a local file, cheaper
                    # than handing each poll to a worker thread and back.
                    lines, parsed = follower.read(self.settings.batch_lines), None
                    self._lag_bytes = follower.lag_bytes()
                else:
                    (lines, parsed), ahead = ahead, None
                if not lines:
                    self._caught_up.set()
                    if unstored is not None:
                        await self._store_checkpoint(unstored)
                        unstored = None
                    if self._stop.is_set():
                        return  # drained: everything written before SIGTERM is settled
                    if self._lag_bytes == 0:
                        self._last_started = None
                    await self._pause()
                    continue
                if self._past_drain():
                    raise _Stopped
                batch = self._batch(lines, parsed)
                settling = self._settle(batch, resume=resume or start_of(lines[0]))
                if len(lines) == self.settings.batch_lines:
                    # A backlog: read and parse the next batch while this one is written.
                    ahead = await self._read_ahead(follower, settling)
                else:
                    await settling
                resume = unstored = batch.checkpoint
                if time.monotonic() - reloaded > _RELOAD_CALIBRATION_S:
                    reloaded = time.monotonic()
                    await self._reload_calibration()
                if len(lines) == self.settings.batch_lines:
                    backlog = True  # read on at once
                    continue
                if self._stop.is_set():
                    continue  # draining: read on until the log is empty
                # Caught up: let what arrives meanwhile gather for a poll interval, so a
                # steady trickle is settled in one batch per interval, not line by line.
                # The next batch stores this position with its own rows; only the end of
                # a backlog stores it at once (the position shows how far meterd is).
                self._caught_up.set()
                if backlog:
                    await self._store_checkpoint(unstored)
                    unstored = None
                    backlog = False
                await self._pause()
        finally:
            follower.close()

    async def _read_ahead(self, follower: Follower, settling: Awaitable[None]) -> _Ahead:
        """Read and parse the next lines while `settling` waits for Postgres and Redis.

        Parsing yields to the event loop every few lines, so the settlement takes each
        step as soon as its reply is in; the lines are measured once it is done (the
        calibration learns from the batch being settled first).
        """
        task = asyncio.ensure_future(settling)
        try:
            await asyncio.sleep(0)  # let it send its statement first
            lines = follower.read(self.settings.batch_lines)
            self._lag_bytes = follower.lag_bytes()
            parsed: list[Event | BadLine] = []
            for start in range(0, len(lines), _PARSE_SLICE):
                parsed += [
                    parse_line(line.data, truncated=line.truncated)
                    for line in lines[start : start + _PARSE_SLICE]
                ]
                await asyncio.sleep(0)
            await task
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})
        return lines, parsed

    async def _store_checkpoint(self, position: Checkpoint) -> None:
        await self._retry("store the checkpoint", functools.partial(self._store.advance, position))

    async def _pause(self) -> None:
        """Wait one poll interval; SIGTERM ends the wait."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.poll_s):
                await self._stop.wait()

    def _past_drain(self) -> bool:
        return self._drain_deadline is not None and time.monotonic() > self._drain_deadline

    # --- one batch ------------------------------------------------------------------------

    def _batch(self, lines: list[Line], parsed: list[Event | BadLine] | None = None) -> Batch:
        """Measure the lines (`parsed`: their parse_line results, if parsed already)."""
        records: list[Record] = []
        bad = 0
        if parsed is None:
            parsed = [parse_line(line.data, truncated=line.truncated) for line in lines]
        for line, event in zip(lines, parsed, strict=True):
            if isinstance(event, BadLine):
                bad += 1
                _log.warning(
                    "skipping bad log line (inode %d, offset %d): %s",
                    line.checkpoint.file.inode,
                    line.start,
                    event.reason,
                )
                continue
            if event.is_probe:
                continue
            measured = measure(event, self._calibration)
            records.append(
                Record(event=event, usage=measured.usage, observation=measured.observation)
            )
        return Batch(
            records=tuple(records),
            checkpoint=lines[-1].checkpoint,
            lines=len(lines),
            bad_lines=bad,
        )

    async def _settle(self, batch: Batch, *, resume: Checkpoint) -> None:
        outcome = await self._retry("settle", lambda: self._store.settle(batch, resume=resume))
        self._calibration.learn(outcome.observations)
        self._lines += batch.lines
        self._bad_lines += batch.bad_lines + outcome.quarantined
        self._settled += outcome.inserted
        metrics.count_lines(
            lines=batch.lines,
            bad=batch.bad_lines,
            records=len(batch.records),
            inserted=outcome.inserted,
        )
        if outcome.quarantined:
            metrics.count_quarantined(outcome.quarantined)
        if batch.records:
            self._last_started = max(r.event.started for r in batch.records).timestamp()

    async def _retry(self, what: str, action: Callable[[], Awaitable[_T]]) -> _T:
        delay = _FIRST_BACKOFF_S
        while True:
            try:
                result = await action()
            except Exception as exc:
                if not is_outage(exc):
                    raise
                if self._stop.is_set() and self._past_drain():
                    raise _Stopped from exc
                self._state = "retrying"
                _log.warning("cannot %s (%s); retrying in %.1fs", what, type(exc).__name__, delay)
                await self._sleep(delay)
                delay = min(delay * 2, self.settings.max_backoff_s)
                continue
            self._state = "draining" if self._stop.is_set() else "ok"
            return result

    async def _sleep(self, seconds: float) -> None:
        """Back off; wake early for SIGTERM, and never sleep past the drain deadline."""
        if self._drain_deadline is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), seconds)
            return
        await asyncio.sleep(max(min(seconds, self._drain_deadline - time.monotonic()), 0.0))

    async def _reload_calibration(self) -> None:
        # Other nodes learn too; their observations reach us through the table.
        try:
            self._calibration.replace(await self._store.load_calibration())
        except Exception as exc:
            if not is_outage(exc):
                raise
            _log.warning("cannot reload the calibration (%s)", type(exc).__name__)

    # --- background -----------------------------------------------------------------------

    def beat(self) -> health.Beat:
        now = time.time()
        behind = self._lag_bytes > 0 and self._last_started is not None
        return health.Beat(
            node=self.settings.node,
            at=now,
            state=self._state,
            lag_bytes=self._lag_bytes,
            lag_seconds=round(now - self._last_started, 3)
            if behind and self._last_started is not None
            else 0.0,
            lines=self._lines,
            bad_lines=self._bad_lines,
            settled=self._settled,
            swept=self._swept,
        )

    async def _heartbeat_loop(self) -> None:
        ttl = self.settings.heartbeat_ttl_s
        failing = False
        while True:
            try:
                await health.publish(self._redis, self.beat(), ttl_s=ttl)
                failing = False
            except Exception as exc:
                if not is_outage(exc):
                    raise
                if not failing:
                    _log.warning("cannot write the heartbeat (%s)", type(exc).__name__)
                failing = True
            await asyncio.sleep(max(ttl / 3, 0.5))

    async def _prune_loop(self) -> None:
        while True:
            try:
                deleted = await self._store.prune_prompts()
                if deleted:
                    _log.info("pruned %d expired prompts", deleted)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                _log.warning("cannot prune prompts (%s)", type(exc).__name__)
            await asyncio.sleep(self.settings.prune_every_s)

    async def _lease_loop(self) -> None:
        """Release leases as lines arrive, ahead of settlement and whatever Postgres does."""
        try:
            async with asyncio.timeout(_LEASE_START_WAIT_S):
                start = await asyncio.shield(self._start)
        except TimeoutError:
            # No checkpoint yet (Postgres down at start): release what ends from now on;
            # leases of requests that ended before expire with their TTL.
            start = _end_of(self.settings.access_log)
            _log.warning("no checkpoint yet; releasing leases from the log's current end")
        follower = Follower(
            self.settings.access_log, start=start, max_line_bytes=self.settings.max_line_bytes
        )
        failing = False
        try:
            while True:
                lines = follower.read(self.settings.batch_lines)
                if not lines:
                    await asyncio.sleep(self.settings.lease_poll_s)
                    continue
                calls = release_calls(lines)
                while True:
                    try:
                        await self._release.run(calls)
                        failing = False
                        break
                    except Exception as exc:
                        if not is_outage(exc):
                            raise
                        if not failing:
                            _log.warning("cannot release leases (%s)", type(exc).__name__)
                        failing = True
                        await asyncio.sleep(_FIRST_BACKOFF_S)
        finally:
            follower.close()

    async def _sweep_loop(self) -> None:
        await self._caught_up.wait()
        while True:
            await self._sweep_once()
            await asyncio.sleep(self.settings.sweep_every_s)

    async def _sweep_once(self) -> None:
        try:
            others = await hold_off_s(self._redis)
            if others is None:
                _log.info("not sweeping reservations: a meterd node has not caught up yet")
                return
            swept = await self._sweeper.sweep(hold_off=max(others, self.beat().lag_seconds))
        except Exception as exc:
            if not is_outage(exc):
                raise
            _log.warning("cannot sweep reservations (%s)", type(exc).__name__)
            return
        self._swept += swept
        metrics.swept(swept)
        if swept:
            _log.warning("charged %d reservations whose log line never arrived", swept)


async def run(settings: Settings) -> int:
    """Run the daemon until SIGTERM; returns the process exit code."""
    metrics.configure(tenant_limit=settings.metrics_tenants)
    # Closed in reverse order on the way out, each even when another close fails.
    async with contextlib.AsyncExitStack() as opened:
        if settings.metrics_port:
            try:
                stop_listener = metrics.serve(
                    bind=settings.metrics_bind, port=settings.metrics_port
                )
            except OSError as exc:
                _log.error(
                    "cannot serve metrics on %s:%d (%s); set NZ_METERD_METRICS_PORT (0: off)",
                    settings.metrics_bind,
                    settings.metrics_port,
                    exc.strerror or type(exc).__name__,
                )
                return _EXIT_CONFIG
            opened.callback(stop_listener)
        # Connects on first use: Postgres being down at start is retried like any outage.
        pool = await create_pool(settings.database_url)
        opened.push_async_callback(_close_pool, pool)
        client = redis_client(
            settings.redis_url,
            settings.sentinels,
            socket_timeout=_REDIS_TIMEOUT_S,
            socket_connect_timeout=_REDIS_TIMEOUT_S,
        )
        opened.push_async_callback(client.aclose)

        def runner(source: str) -> SettleScript:
            """A batch runner of one script on the (current primary) Redis, closed on exit."""
            built = SettleScript(
                source=source,
                redis_url=settings.redis_url,
                redis=client,
                timeout_s=_REDIS_TIMEOUT_S,
                locate=primary_locator(settings.sentinels, timeout_s=_REDIS_TIMEOUT_S),
            )
            opened.push_async_callback(built.aclose)
            return built

        script = runner(contract.settle_script())
        release = runner(contract.release_script())
        return await Daemon(settings, pool=pool, redis=client, script=script, release=release).run()


async def _close_pool(pool: asyncpg.Pool) -> None:
    try:
        async with asyncio.timeout(_CLOSE_S):
            await pool.close()
    except TimeoutError:
        pool.terminate()  # Postgres does not answer: just drop the connections

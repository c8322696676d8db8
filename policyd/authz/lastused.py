"""Record when each key was last used, without a Postgres write per request.

Uses are collected in memory and flushed in one statement every few seconds; a lost
flush only makes `last used` a few seconds stale, it never affects admission.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import uuid

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from policyd.shared.tables import api_keys

__all__ = ["LastUsedTracker"]

_log = logging.getLogger("policyd.authz.lastused")


class LastUsedTracker:
    """Batches `last_used_at` updates per key."""

    def __init__(self, *, engine: AsyncEngine, interval_s: float) -> None:
        self._engine = engine
        self._interval_s = interval_s
        self._pending: dict[str, dt.datetime] = {}
        self._task: asyncio.Task[None] | None = None

    def touch(self, key_id: str) -> None:
        self._pending[key_id] = dt.datetime.now(dt.UTC)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="last-used-flush")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        stmt = (
            sa.update(api_keys)
            .where(api_keys.c.id == sa.bindparam("b_id"))
            .where(
                sa.or_(
                    api_keys.c.last_used_at.is_(None),
                    api_keys.c.last_used_at < sa.bindparam("b_at"),
                )
            )
            .values(last_used_at=sa.bindparam("b_at"))
        )
        params = [{"b_id": uuid.UUID(k), "b_at": at} for k, at in batch.items()]
        try:
            async with self._engine.begin() as conn:
                await conn.execute(stmt, params)
        except (SQLAlchemyError, OSError) as exc:
            _log.warning("could not record key usage times: %s", type(exc).__name__)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.flush()

"""Prompt retention: the one way expired logged prompts are deleted.

meterd runs it hourly on its asyncpg pool; the CLI's `prune-prompts` runs it on an
asyncpg connection taken from its engine. Both hand in anything with asyncpg's
`execute(sql, *args) -> "DELETE <n>"`.
"""

from __future__ import annotations

from typing import Any, Final, Protocol

__all__ = ["PRUNE_CHUNK", "Executor", "prune_expired_prompts"]

#: Rows per statement: each chunk is its own transaction, so none holds locks for long.
PRUNE_CHUNK: Final = 10_000

_PRUNE_PROMPTS: Final = """
DELETE FROM prompt_log
 WHERE request_id = ANY(ARRAY(
    SELECT request_id FROM prompt_log WHERE expires_at <= now() ORDER BY expires_at LIMIT $1))
"""


class Executor(Protocol):
    """An asyncpg pool or connection."""

    async def execute(self, query: str, *args: Any) -> str: ...


async def prune_expired_prompts(db: Executor, *, chunk: int = PRUNE_CHUNK) -> int:
    """Delete every prompt whose retention has passed, in chunks; returns how many went."""
    total = 0
    while True:
        status = await db.execute(_PRUNE_PROMPTS, chunk)
        deleted = int(status.rpartition(" ")[2])
        total += deleted
        if deleted < chunk:
            return total

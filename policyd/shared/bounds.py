"""What the stores can hold, and the largest values operators may set.

The CLI checks every operator value against these before writing (one clear line
instead of a database error), and meterd bounds what it reads back with the same
numbers, so a value written some other way (SQL by hand, an older CLI) cannot stop it.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "INT4_MAX",
    "INT8_MAX",
    "LIMIT_MAXIMA",
    "MAX_EXPIRY_DAYS",
    "MAX_LOOKBACK_DAYS",
    "MAX_PROMPT_RETENTION_DAYS",
    "MAX_TOKENS",
]

#: Postgres `integer` and `bigint`.
INT4_MAX: Final = 2**31 - 1
INT8_MAX: Final = 2**63 - 1

#: Largest token limit: Redis's Lua counts in doubles, exact up to 2**53.
MAX_TOKENS: Final = 2**53 - 1
#: Longest prompt retention, in days (ten years).
MAX_PROMPT_RETENTION_DAYS: Final = 3650
#: Furthest a key's expiry may lie ahead, in days (a hundred years; never `infinity`).
MAX_EXPIRY_DAYS: Final = 36500
#: Furthest back `--since`/`--until` may reach, in days (a hundred years).
MAX_LOOKBACK_DAYS: Final = 36500

#: Largest value per limit column (the column's type, or a stated maximum).
LIMIT_MAXIMA: Final = {
    "rpm": INT4_MAX,
    "tpm": MAX_TOKENS,
    "concurrency": INT4_MAX,
    "daily_tokens": MAX_TOKENS,
    "monthly_tokens": MAX_TOKENS,
    "total_tokens": MAX_TOKENS,
    "max_output_tokens": INT4_MAX,
    "max_keep_alive_seconds": INT4_MAX,
    "max_num_ctx": INT4_MAX,
    "prompt_retention_days": MAX_PROMPT_RETENTION_DAYS,
}

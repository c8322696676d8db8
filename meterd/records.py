"""What settlement works on: a parsed request with its usage, and a batch of them.

Its own module so that settle.py (the steps) and writes.py (the SQL) both use it
without importing each other.
"""

from __future__ import annotations

import attrs

from meterd.parse import Event
from meterd.tail import Checkpoint
from meterd.usage import Observation, Usage

__all__ = ["Batch", "Record"]


@attrs.frozen(kw_only=True)
class Record:
    """One parsed request and the usage it is settled with."""

    event: Event
    usage: Usage
    observation: Observation | None = None


@attrs.frozen(kw_only=True)
class Batch:
    """Consecutive lines of the log: their records and the position after the last one."""

    records: tuple[Record, ...]
    checkpoint: Checkpoint
    lines: int
    bad_lines: int

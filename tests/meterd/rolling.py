"""A writer that rolls a log exactly as Caddy's file writer (lumberjack) does.

Rolling renames `access.log` to `access-<UTC time>-size.log` in the same directory and
creates a fresh `access.log`; lines are written whole with one `write` each.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

__all__ = ["RollingWriter"]


class RollingWriter:
    """Appends lines to `path`, rolling like Caddy when told to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = self._create()
        self.rolled: list[Path] = []

    def _create(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)

    def write(self, data: bytes) -> None:
        os.write(self._fd, data)

    def line(self, data: bytes) -> None:
        self.write(data + b"\n")

    def roll(self) -> Path:
        """Rename the live file to its backup name and start a new one (lumberjack's order)."""
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H-%M-%S.%f")
        target = self.path.with_name(f"{self.path.stem}-{stamp}-size{self.path.suffix}")
        os.close(self._fd)
        os.rename(self.path, target)
        self._fd = self._create()
        self.rolled.append(target)
        return target

    def close(self) -> None:
        os.close(self._fd)

"""Memory and CPU of the parts, read from /proc (Linux only).

A part is a process family (Granian's supervisor plus its worker, Postgres and its
backends), so RSS and CPU time are summed over the family.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

from compose.local.processes import ProcessHandle

__all__ = ["CpuMeter", "cpu_seconds", "rss_mib"]

_TICKS: Final = os.sysconf("SC_CLK_TCK")
_PAGE: Final = os.sysconf("SC_PAGE_SIZE")


def _proc_cpu(pid: int) -> float:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()
    # Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the command name.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _proc_rss(pid: int) -> int:
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    return 0


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds used so far by these processes."""
    return sum(_proc_cpu(pid) for pid in pids)


def rss_mib(handle: ProcessHandle) -> float:
    """Resident memory of the whole process family, MiB."""
    return sum(_proc_rss(pid) for pid in handle.family()) / (1024 * 1024)


class CpuMeter:
    """CPU seconds each part spends between `start()` and `stop()`."""

    def __init__(self, handles: Mapping[str, ProcessHandle]) -> None:
        self._families = {name: handle.family() for name, handle in handles.items()}
        self._before: dict[str, float] = {}
        self.spent: dict[str, float] = {}

    def start(self) -> None:
        self._before = {name: cpu_seconds(pids) for name, pids in self._families.items()}

    def stop(self) -> dict[str, float]:
        self.spent = {
            name: cpu_seconds(pids) - self._before[name] for name, pids in self._families.items()
        }
        return self.spent

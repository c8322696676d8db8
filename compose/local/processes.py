"""Start, identify and stop local server processes by PID.

Every server is started as the leader of its own process group, and stopping it takes the
whole family down: the group plus every descendant (PostgreSQL backends call `setsid()`,
so the group alone would miss them). A process is identified by PID *and* its kernel start
time, so a stale PID file never makes us signal an unrelated process that reused the PID.
Linux only: the checks read `/proc`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Final

import attrs

__all__ = [
    "RESERVED_PORTS",
    "ProcessHandle",
    "ReadinessError",
    "base_env",
    "free_port",
    "listens_on",
    "log_tail",
    "process_alive",
    "spawn",
    "wait_until",
]

#: Ports the brief keeps for real services and `make up`; tests never take them.
RESERVED_PORTS: Final = frozenset({5432, 6379, 8080, 9180, 9181, 11434, 11435, 55432, 56379})

#: Variables a child may inherit; everything else (notably NZ_*) is passed explicitly.
_INHERITED_ENV: Final = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "LOGNAME")

_POLL_S: Final = 0.05


class ReadinessError(RuntimeError):
    """A server did not become ready (it exited early or timed out); carries its log tail."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago and is not reserved."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in RESERVED_PORTS:
            return port


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal child environment: PATH and locale from ours, settings only from `extra`."""
    env = {name: os.environ[name] for name in _INHERITED_ENV if name in os.environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.update(extra or {})
    return env


def log_tail(path: Path, *, lines: int = 40) -> str:
    """The last `lines` lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


@attrs.frozen
class _Stat:
    state: str
    ppid: int
    pgrp: int
    start_time: int


def _stat(pid: int) -> _Stat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses; fields resume after ")".
    fields = raw[raw.rindex(")") + 2 :].split()
    return _Stat(
        state=fields[0], ppid=int(fields[1]), pgrp=int(fields[2]), start_time=int(fields[19])
    )


def _all_stats() -> dict[int, _Stat]:
    stats: dict[int, _Stat] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
            stats[int(entry.name)] = st
    return stats


def _live(st: _Stat | None) -> bool:
    # Zombies are dead for our purposes: PID 1 in a container may never reap them.
    return st is not None and st.state not in ("Z", "X")


def process_alive(pid: int, start_time: int) -> bool:
    """Whether the process with this PID *and* start time is still running."""
    st = _stat(pid)
    return _live(st) and st is not None and st.start_time == start_time


def _socket_inodes(pids: Iterable[int]) -> set[str]:
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    target = os.readlink(fd.path)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    return inodes


def listens_on(pids: Iterable[int], port: int) -> bool:
    """Whether one of `pids` holds the listening socket on 127.0.0.1:`port`.

    A readiness probe alone would be fooled if someone else grabbed the port between
    `free_port()` and our bind; this asks the kernel who owns the listener.
    """
    inodes = _socket_inodes(pids)
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            cols = line.split()
            if cols[1] == wanted and cols[3] == "0A" and cols[9] in inodes:
                return True
    return False


def _kill(pid: int, start_time: int, sig: signal.Signals) -> None:
    if process_alive(pid, start_time):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@attrs.frozen(kw_only=True)
class ProcessHandle:
    """One started server: the leader of its process group, identified by PID + start time."""

    name: str
    pid: int
    start_time: int
    log_path: Path
    stop_signal: signal.Signals = signal.SIGTERM
    #: Who receives `stop_signal` when that is not the leader (the postmaster under runuser).
    signal_pid: int | None = None
    _popen: subprocess.Popen[bytes] | None = attrs.field(
        default=None, eq=False, repr=False, alias="popen"
    )

    @property
    def running(self) -> bool:
        """Whether any process of this server's family is still alive."""
        self._reap()
        return bool(self.family())

    def family(self) -> set[int]:
        """Live PIDs of the group plus all descendants of the leader."""
        stats = _all_stats()
        leader = stats.get(self.pid)
        if leader is not None and leader.start_time != self.start_time:
            return set()  # the PID was reused: our group cannot exist any more
        members = {pid for pid, st in stats.items() if st.pgrp == self.pid and _live(st)}
        if not _live(leader):
            return members
        descendants, frontier = {self.pid}, [self.pid]
        while frontier:
            parent = frontier.pop()
            for pid, st in stats.items():
                if st.ppid == parent and pid not in descendants and _live(st):
                    descendants.add(pid)
                    frontier.append(pid)
        return members | descendants

    def signal(self, sig: signal.Signals) -> None:
        """Send `sig` to the leader (never to a process that merely reused its PID)."""
        _kill(self.pid, self.start_time, sig)

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop gracefully, then SIGKILL every survivor; returns only when none is left.

        `stop_signal` goes to the leader (or `signal_pid`), which is expected to stop its
        own children; whatever it leaves behind gets `stop_signal` next, and SIGKILL once
        `timeout` has passed.
        """
        family = {pid: st.start_time for pid in self.family() if (st := _stat(pid))}
        if not family:
            self._reap_finally()
            return
        deadline = time.monotonic() + timeout
        target = self.signal_pid if self.signal_pid in family else self.pid
        if target in family:
            _kill(target, family[target], self.stop_signal)
            self._wait_gone({target: family[target]}, deadline)
        for pid, start in family.items():
            _kill(pid, start, self.stop_signal)
        if not self._wait_gone(family, deadline):
            for pid, start in family.items():
                _kill(pid, start, signal.SIGKILL)
            if not self._wait_gone(family, time.monotonic() + 10.0):
                alive = {p: _stat(p) for p, start in family.items() if process_alive(p, start)}
                raise RuntimeError(f"{self.name}: processes survived SIGKILL: {alive}")
        self._reap_finally()

    def _wait_gone(self, family: Mapping[int, int], deadline: float) -> bool:
        while True:
            self._reap()
            if not any(process_alive(pid, start) for pid, start in family.items()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)

    def _reap(self) -> None:
        # Collect our own child's exit status so it does not linger as a zombie.
        if self._popen is not None:
            self._popen.poll()

    def _reap_finally(self) -> None:
        # Called once the family is dead (zombies count as dead): waiting cannot block,
        # and a Popen collected without its exit status would warn "still running".
        if self._popen is not None:
            self._popen.wait(timeout=5.0)

    def write_pidfile(self, path: Path) -> None:
        """Record this handle so another process (`make down`) can stop it later."""
        data = {
            "name": self.name,
            "pid": self.pid,
            "start_time": self.start_time,
            "log_path": str(self.log_path),
            "stop_signal": self.stop_signal.name,
            "signal_pid": self.signal_pid,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data) + "\n")
        tmp.replace(path)

    @classmethod
    def from_pidfile(cls, path: Path) -> ProcessHandle | None:
        """The handle recorded in `path`, or None when the file is absent or stale."""
        try:
            data = json.loads(path.read_text())
            handle = cls(
                name=str(data["name"]),
                pid=int(data["pid"]),
                start_time=int(data["start_time"]),
                log_path=Path(data["log_path"]),
                stop_signal=signal.Signals[data["stop_signal"]],
                signal_pid=None if data["signal_pid"] is None else int(data["signal_pid"]),
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            # Written atomically by us, so this is damage; say so rather than guess.
            raise ValueError(f"unreadable PID file {path}: {exc}") from exc
        return handle if handle.running else None


def spawn(
    name: str,
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str],
    cwd: Path | None = None,
    stop_signal: signal.Signals = signal.SIGTERM,
) -> ProcessHandle:
    """Start `argv` as a new session leader with stdout+stderr appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        log.write(f"--- {stamp} starting {name}: {shlex.join(argv)}\n".encode())
        log.flush()
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    # Unreaped, the child's /proc entry survives even if it already exited.
    st = _stat(popen.pid)
    if st is None:
        raise RuntimeError(f"{name}: /proc/{popen.pid} vanished right after start")
    return ProcessHandle(
        name=name,
        pid=popen.pid,
        start_time=st.start_time,
        log_path=log_path,
        stop_signal=stop_signal,
        popen=popen,
    )


def wait_until(
    check: Callable[[], bool],
    *,
    handle: ProcessHandle,
    what: str,
    timeout: float = 30.0,
) -> None:
    """Poll `check` until true; stop the process and raise if it dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if not handle.running:
            if check():  # it got there as it exited (or exiting was the point)
                return
            reason = "exited before it was ready"
        elif time.monotonic() >= deadline:
            reason = f"not ready after {timeout:g}s"
        else:
            time.sleep(_POLL_S)
            continue
        handle.stop(timeout=5.0)
        raise ReadinessError(
            f"{what} {reason}; log {handle.log_path}:\n{log_tail(handle.log_path)}"
        )

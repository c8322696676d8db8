"""The process mechanics: free ports, stop by PID, PID files, readiness failures."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from compose.local.processes import (
    RESERVED_PORTS,
    ProcessHandle,
    ReadinessError,
    base_env,
    free_port,
    process_alive,
    spawn,
    wait_until,
)

__all__: list[str] = []

# A parent with two children and a grandchild, all sleeping.
_TREE = "sleep 300 & sh -c 'sleep 300 & wait' & wait"
# A shell that ignores SIGTERM, so only SIGKILL ends it.
_STUBBORN = "trap '' TERM; sleep 300 & wait; sleep 300"


SpawnSh = Callable[[str], ProcessHandle]


@pytest.fixture
def spawn_sh(tmp_path: Path) -> Iterator[SpawnSh]:
    """Start `sh -c SCRIPT`; whatever a failing test leaves running is stopped afterwards."""
    started: list[ProcessHandle] = []

    def start(script: str) -> ProcessHandle:
        handle = spawn("sh", ["sh", "-c", script], log_path=tmp_path / "sh.log", env=base_env())
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop(timeout=1.0)


def _wait_for_family(handle: ProcessHandle, size: int) -> dict[int, int]:
    """The live family once it has `size` members, as PID -> kernel start time."""
    wait_until(lambda: len(handle.family()) >= size, handle=handle, what="process tree")
    return {pid: _start_time(pid) for pid in handle.family()}


def _start_time(pid: int) -> int:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return int(raw[raw.rindex(")") + 2 :].split()[19])


def _survivors(members: dict[int, int]) -> list[int]:
    return [pid for pid, start in members.items() if process_alive(pid, start)]


def test_free_port_is_bindable_and_not_reserved() -> None:
    """free_port returns a port on 127.0.0.1 that can be bound and is never a reserved one."""
    for _ in range(20):
        port = free_port()
        assert port not in RESERVED_PORTS
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_stop_ends_the_whole_process_tree(spawn_sh: SpawnSh) -> None:
    """stop() by PID leaves no process of the tree alive, grandchildren included."""
    handle = spawn_sh(_TREE)
    members = _wait_for_family(handle, 4)
    handle.stop(timeout=5.0)
    assert not handle.running
    assert _survivors(members) == []


def test_stop_escalates_to_sigkill(spawn_sh: SpawnSh) -> None:
    """A process that ignores SIGTERM is killed once the timeout passes."""
    handle = spawn_sh(_STUBBORN)
    members = _wait_for_family(handle, 2)
    handle.stop(timeout=0.5)
    assert not handle.running
    assert _survivors(members) == []


def test_stop_is_idempotent(spawn_sh: SpawnSh) -> None:
    """Stopping an already stopped process is a harmless no-op."""
    handle = spawn_sh("sleep 300")
    handle.stop()
    handle.stop()
    assert not handle.running


def test_stop_reaches_children_that_left_the_group(spawn_sh: SpawnSh) -> None:
    """A descendant in its own session (as PostgreSQL backends are) is stopped too."""
    handle = spawn_sh(f"{sys.executable} -c 'import os,time; os.setsid(); time.sleep(300)' & wait")
    wait_until(
        lambda: any(os.getpgid(pid) != handle.pid for pid in handle.family()),
        handle=handle,
        what="setsid child",
    )
    members = _wait_for_family(handle, 2)
    handle.stop(timeout=5.0)
    assert _survivors(members) == []


def test_pidfile_round_trip_and_staleness(spawn_sh: SpawnSh, tmp_path: Path) -> None:
    """A PID file yields the same handle while the process runs and None once it is gone."""
    handle = spawn_sh("sleep 300")
    pidfile = tmp_path / "sh.pid"
    handle.write_pidfile(pidfile)
    loaded = ProcessHandle.from_pidfile(pidfile)
    assert loaded is not None
    assert (loaded.pid, loaded.start_time) == (handle.pid, handle.start_time)
    loaded.stop()
    assert not handle.running
    assert ProcessHandle.from_pidfile(pidfile) is None
    assert ProcessHandle.from_pidfile(tmp_path / "absent.pid") is None


def test_pidfile_with_reused_pid_is_stale(spawn_sh: SpawnSh, tmp_path: Path) -> None:
    """A PID file whose start time does not match the live process is never trusted."""
    handle = spawn_sh("sleep 300")
    pidfile = tmp_path / "sh.pid"
    forged = ProcessHandle(
        name="sh", pid=handle.pid, start_time=handle.start_time + 1, log_path=handle.log_path
    )
    forged.write_pidfile(pidfile)
    assert ProcessHandle.from_pidfile(pidfile) is None
    forged.stop(timeout=0.5)
    assert handle.running


def test_wait_until_reports_early_exit_with_log(spawn_sh: SpawnSh) -> None:
    """A server that dies before it is ready raises ReadinessError quoting its log."""
    handle = spawn_sh("echo 'bind: address in use' >&2; exit 3")
    with pytest.raises(ReadinessError, match="address in use"):
        wait_until(lambda: False, handle=handle, what="doomed server", timeout=10.0)
    assert not handle.running


def test_wait_until_times_out_and_stops_the_process(spawn_sh: SpawnSh) -> None:
    """A server that never becomes ready is stopped and reported after the timeout."""
    handle = spawn_sh("sleep 300")
    with pytest.raises(ReadinessError, match="not ready after"):
        wait_until(lambda: False, handle=handle, what="slow server", timeout=0.3)
    assert not handle.running


def test_signal_is_delivered_only_to_the_recorded_process(spawn_sh: SpawnSh) -> None:
    """signal() reaches the leader it recorded (here: SIGTERM ends a plain sleep)."""
    handle = spawn_sh("exec sleep 300")
    handle.signal(signal.SIGTERM)
    wait_until(lambda: not handle.running, handle=handle, what="exit", timeout=5.0)

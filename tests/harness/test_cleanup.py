"""Session fixtures stop their servers by PID even when tests fail or pytest is terminated."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from compose.local.processes import process_alive
from compose.local.services import REPO_ROOT

__all__: list[str] = []

_INNER_TEST = """
import json, os, time
from pathlib import Path

def test_inner(redis_server):
    handle = redis_server.handle
    Path(os.environ["NZ_INNER_OUT"]).write_text(
        json.dumps({{"pid": handle.pid, "start": handle.start_time}})
    )
    {action}
"""


def _run_inner(tmp_path: Path, action: str, *, terminate: bool) -> tuple[str, dict[str, int]]:
    """Run a one-test pytest session using our conftest as a plugin; return output and pid."""
    test_file = tmp_path / "test_inner.py"
    test_file.write_text(_INNER_TEST.format(action=action))
    out = tmp_path / "redis.json"
    argv = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-q", "-p", "no:cacheprovider"]
    argv += ["--rootdir", str(tmp_path), "-c", "/dev/null", str(test_file)]
    child = subprocess.Popen(
        argv,
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "NZ_INNER_OUT": str(out), "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not out.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if terminate:
            child.send_signal(signal.SIGTERM)
        output, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert out.exists(), output
    return output, json.loads(out.read_text())


def test_failing_test_still_stops_servers_and_keeps_logs(tmp_path: Path) -> None:
    """After a failed test the session Redis is gone and the log directory is reported."""
    output, redis = _run_inner(tmp_path, "assert False, 'boom'", terminate=False)
    assert "1 failed" in output
    assert not process_alive(redis["pid"], redis["start"])
    kept = re.search(r"service logs kept in (\S+)", output)
    assert kept is not None, output
    shutil.rmtree(Path(kept.group(1)).parent)


def test_sigterm_to_pytest_still_stops_servers(tmp_path: Path) -> None:
    """SIGTERM to a running pytest session stops the servers its fixtures started."""
    _, redis = _run_inner(tmp_path, "time.sleep(60)", terminate=True)
    assert not process_alive(redis["pid"], redis["start"])

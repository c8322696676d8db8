"""A running dev gateway (real Caddy + fake policyd/Ollama) and ways to talk to it."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tests.caddy.fakes import FakeAuth, FakeUpstream

__all__ = ["MAX_BODY_BYTES", "Gateway", "RawResponse"]

#: The test gateway's NZ_MAX_BODY_BYTES: small enough that a test can exceed it cheaply.
MAX_BODY_BYTES: Final = 4096


@dataclass(frozen=True, slots=True)
class RawResponse:
    """A response read off a raw socket."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """First value of header `name` (case-insensitive), or None."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)


@dataclass(frozen=True, slots=True)
class Gateway:
    """Where the test gateway listens and what sits behind it."""

    port: int
    auth: FakeAuth
    upstream: FakeUpstream
    access_log: Path
    stderr_log: Path

    @property
    def base_url(self) -> str:
        """Base URL clients use (its host matches the site address)."""
        return f"http://127.0.0.1:{self.port}"

    def raw(
        self,
        target: str,
        *,
        method: str = "GET",
        headers: tuple[tuple[str, str], ...] = (),
        body: bytes = b"",
        host: str | None = None,
    ) -> RawResponse:
        """Send `target` byte for byte (no client-side normalisation) and read the answer."""
        lines = [
            f"{method} {target} HTTP/1.1",
            f"Host: {host or f'127.0.0.1:{self.port}'}",
            "Connection: close",
            f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in headers),
        ]
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(request)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parsed = tuple(
            (name.strip(), value.strip())
            for name, _, value in (line.partition(":") for line in header_lines)
        )
        return RawResponse(status=int(status_line.split(" ")[1]), headers=parsed, body=rest)

    def log_lines(self) -> list[str]:
        """Every access-log line written so far."""
        if not self.access_log.exists():
            return []
        return self.access_log.read_text().splitlines()

    def log_entry(self, request_id: str, *, timeout: float = 5.0) -> tuple[dict[str, Any], str]:
        """The parsed access-log entry for `request_id` and its raw line (waits for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_lines():
                entry: dict[str, Any] = json.loads(line)
                if entry.get("uuid") == request_id:
                    return entry, line
            time.sleep(0.05)
        raise AssertionError(f"no access-log line with uuid {request_id}")

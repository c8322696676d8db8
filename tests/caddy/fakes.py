"""Tiny stand-ins for policyd and Ollama, used only to observe what Caddy sends them.

They record the exact request line and headers each side receives, so the tests can prove
what Caddy strips, adds and blocks. The real policyd is tested end to end elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import json
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Final

from policyd.shared import contract

__all__ = [
    "GOOD_KEY",
    "KEY_ID",
    "STREAM_GAP_S",
    "STREAM_LINES",
    "TENANT_ID",
    "FakeAuth",
    "FakeUpstream",
    "SeenRequest",
    "stream_lines",
    "upstream_reply",
]

#: The only bearer token the fake auth service accepts.
# Well-formed (the gateway asks policyd without the body for anything else).
GOOD_KEY: Final = "nz_testtest_" + "Good" * 10 + "Key"
#: The fake upstream's /api/stream* answers: this many NDJSON lines, this far apart.
STREAM_LINES: Final = 4
STREAM_GAP_S: Final = 0.3
#: What the fake auth service reports as the key id on success.
KEY_ID: Final = "key-from-auth"
TENANT_ID: Final = "tenant-from-auth"


@dataclass(frozen=True, slots=True)
class SeenRequest:
    """One request exactly as a fake server received it."""

    request_line: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def target(self) -> str:
        """The raw request-target from the request line."""
        return self.request_line.split(" ")[1]

    def values(self, name: str) -> list[str]:
        """Every value of header `name` (case-insensitive)."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    def header(self, name: str) -> str | None:
        """The single value of header `name`, or None when absent."""
        found = self.values(name)
        assert len(found) <= 1, f"{name} sent {len(found)} times: {found}"
        return found[0] if found else None

    def names(self) -> set[str]:
        """Lower-cased names of every header received."""
        return {key.lower() for key, _ in self.headers}


class _Recorder:
    """Thread-safe list of what one fake server saw."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: list[SeenRequest] = []

    def add(self, seen: SeenRequest) -> None:
        with self._lock:
            self._seen.append(seen)

    def all(self) -> list[SeenRequest]:
        with self._lock:
            return list(self._seen)

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()

    def by_request_id(self, request_id: str) -> SeenRequest:
        matches = [s for s in self.all() if s.header(contract.H_REQUEST_ID) == request_id]
        assert len(matches) == 1, f"{len(matches)} requests with id {request_id}"
        return matches[0]


class _RecordingHandler(BaseHTTPRequestHandler):
    """Reads one request fully and hands it to `reply`."""

    protocol_version = "HTTP/1.1"
    recorder: _Recorder

    def log_message(self, format: str, *args: object) -> None:
        # Silence the default stderr access log (and its client_address[0] on unix sockets).
        return

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _handle(self) -> None:
        seen = SeenRequest(
            request_line=self.requestline,
            headers=tuple(self.headers.items()),
            body=self._read_body(),
        )
        # Caddy's active health checks (GET /api/version, marked) run on their own clock;
        # the tests look at the requests clients caused.
        if seen.header("X-Nz-Health-Check") is None:
            self.recorder.add(seen)
        self.respond(seen)

    def respond(self, seen: SeenRequest) -> None:
        status, headers, body = self.reply(seen)
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def reply(self, seen: SeenRequest) -> tuple[int, list[tuple[str, str]], bytes]:
        raise NotImplementedError

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _handle


class _AuthHandler(_RecordingHandler):
    def reply(self, seen: SeenRequest) -> tuple[int, list[tuple[str, str]], bytes]:
        json_type = ("Content-Type", "application/json")
        if seen.target in ("/healthz", "/readyz"):
            return 200, [json_type], b'{"status":"ok"}'
        try:
            base64.b64decode(seen.header(contract.H_BODY) or "", validate=True)
        except binascii.Error:
            # Caddy puts an error text here when the body exceeds max_size.
            return 400, [json_type], b'{"error":"body not base64"}'
        if seen.header("Authorization") != f"Bearer {GOOD_KEY}":
            return 401, [json_type, ("WWW-Authenticate", "Bearer")], b'{"error":"unauthorized"}'
        uri = seen.header("X-Forwarded-Uri") or ""
        capture = "capture" in uri
        return 200, [(contract.H_GRANT, grant(capture=capture).encode())], b""


def grant(*, capture: bool) -> contract.Grant:
    """The grant the fake policyd answers with: captured replies are not streamed."""
    return contract.Grant(
        key_id=KEY_ID,
        key_prefix="nz_fakekey0",
        tenant_id=TENANT_ID,
        surface="ollama",
        stream=not capture,
        capture=capture,
        model="m",
    )


def upstream_reply(target: str) -> bytes:
    """The body the fake upstream answers `target` with (Ollama-like, with token counts)."""
    reply = {"model": "m", "target": target, "prompt_eval_count": 3, "eval_count": 5}
    return json.dumps(reply).encode()


def stream_lines() -> list[bytes]:
    """The NDJSON lines the fake upstream streams, one every STREAM_GAP_S seconds."""
    return [
        json.dumps({"i": i, "done": i == STREAM_LINES - 1}).encode() + b"\n"
        for i in range(STREAM_LINES)
    ]


class _UpstreamHandler(_RecordingHandler):
    def reply(self, seen: SeenRequest) -> tuple[int, list[tuple[str, str]], bytes]:
        return 200, [("Content-Type", "application/json")], upstream_reply(seen.target)

    def respond(self, seen: SeenRequest) -> None:
        if seen.target == "/api/cut":
            # A stream that dies half-way: Caddy logs an error about the request.
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            line = stream_lines()[0]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if not seen.target.startswith("/api/stream"):
            super().respond(seen)
            return
        # /api/stream: chunked like Ollama; /api/stream-length: one declared Content-Length,
        # the case where only flush_interval -1 keeps Caddy from buffering.
        lines = stream_lines()
        chunked = seen.target == "/api/stream"
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(sum(map(len, lines))))
        self.end_headers()
        for index, line in enumerate(lines):
            if index:
                time.sleep(STREAM_GAP_S)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line) if chunked else line)
            self.wfile.flush()
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False


class _TCPHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


class _Running:
    """A server running in a background thread, with its recorder."""

    def __init__(self, server: socketserver.BaseServer, recorder: _Recorder) -> None:
        self.server = server
        self.recorder = recorder
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


class FakeAuth(_Running):
    """policyd stand-in on a unix socket: 200 + X-Nz-* for GOOD_KEY, 401 otherwise."""

    def __init__(self, *, socket_path: Path) -> None:
        recorder = _Recorder()
        handler = type("Handler", (_AuthHandler,), {"recorder": recorder})
        super().__init__(_UnixHTTPServer(str(socket_path), handler), recorder)


class FakeUpstream(_Running):
    """Ollama stand-in on 127.0.0.1: records each request, answers Ollama-like JSON."""

    def __init__(self) -> None:
        recorder = _Recorder()
        handler = type("Handler", (_UpstreamHandler,), {"recorder": recorder})
        server = _TCPHTTPServer(("127.0.0.1", 0), handler)
        self.port: int = server.server_address[1]
        super().__init__(server, recorder)

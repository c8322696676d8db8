"""Requests whose client left early, through the real Caddy: each pays what reached Ollama.

The stand-in here answers its first token only after two seconds, like a model reading
a long prompt, so a client can leave before the response headers, mid-stream, or while
a non-streamed reply is being generated.
"""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import pytest

from compose.local.parts import Stack, StackConfig
from compose.local.services import PostgresServer, RedisServer, Service
from meterd.usage import ABORTED_TOKENS_PER_S
from tests.e2e.conftest import make_key
from tests.e2e.test_metering import audit_rows

__all__: list[str] = []

_FIRST_TOKEN_MS: Final = 2000
_OUTPUT_CAP: Final = 500
#: About 1,500 prompt tokens by policyd's count (one per three characters).
_PROMPT: Final = "The river bends where the valley widens. " * 110


@pytest.fixture(scope="module")
def late_stack(
    run_dir: Path,
    postgres: Service[PostgresServer],
    database_url: str,
    redis_server: Service[RedisServer],
) -> Iterator[Stack]:
    """A gateway whose stand-in sends its first token two seconds after the request."""
    built = Stack(
        StackConfig(
            base_dir=run_dir / "late-stack",
            standin_tokens_per_s=20,
            standin_first_token_ms=_FIRST_TOKEN_MS,
        ),
        postgres=postgres,
        redis=redis_server,
    )
    with built:
        yield built


def _send(gateway: str, key: str, *, stream: bool) -> socket.socket:
    """Open a connection and send one chat request; the caller reads and closes."""
    parts = urlsplit(gateway)
    body = json.dumps(
        {
            "model": "llama3.2",
            "messages": [{"role": "user", "content": _PROMPT}],
            "stream": stream,
            "options": {"num_predict": _OUTPUT_CAP},
        }
    ).encode()
    head = (
        f"POST /api/chat HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=30)
    sock.sendall(head + body)
    return sock


def _request_id(stack: Stack, *, after: int) -> str:
    """The request id of the one admitted request logged past byte `after` of the log."""
    deadline = time.monotonic() + 20
    while True:
        with stack.access_log.open("rb") as log:
            log.seek(after)
            found = [json.loads(line) for line in log if line.strip()]
        admitted = [d for d in found if d.get("nz_grant")]
        if admitted:
            assert len(admitted) == 1, admitted
            return str(admitted[0]["uuid"])
        assert time.monotonic() < deadline, "no log line for the request"
        time.sleep(0.1)


def _abandon(
    stack: Stack, key: str, *, stream: bool, read_until: bytes | None, wait_s: float
) -> dict[str, Any]:
    """Send, read until `read_until` appears (if given) or wait `wait_s`, then drop the
    connection; returns the request's audit row."""
    offset = stack.access_log.stat().st_size if stack.access_log.exists() else 0
    sock = _send(stack.gateway_url, key, stream=stream)
    received = b""
    try:
        if read_until is not None:
            while read_until not in received:
                chunk = sock.recv(65536)
                assert chunk, received
                received += chunk
        else:
            time.sleep(wait_s)
    finally:
        sock.close()
    request_id = _request_id(stack, after=offset)
    row: dict[str, Any] = audit_rows(stack, [request_id])[request_id]
    return row


def test_a_stream_dropped_before_its_first_token_pays_its_prompt(late_stack: Stack) -> None:
    """Client gone before the response headers (499, no bytes): Ollama read the prompt,
    so the request pays policyd's count of it, and no completion."""
    key = make_key(late_stack, name="early")
    row = _abandon(late_stack, key, stream=True, read_until=None, wait_s=0.5)
    assert row["status"] == 499
    assert row["bytes_out"] == 0
    prompt = row["reserved_tokens"] - _OUTPUT_CAP  # policyd's count
    assert prompt > 1000
    assert row["prompt_tokens"] == prompt
    assert row["completion_tokens"] == 0
    assert row["usage_source"] == "estimated"


def test_a_stream_dropped_mid_way_pays_its_prompt_and_what_was_sent(late_stack: Stack) -> None:
    """Client gone after its first chunk (Caddy logs 200 and the bytes sent): it pays its
    prompt as estimated for any stream and one completion token per chunk it was sent,
    far from its reservation."""
    key = make_key(late_stack, name="middle")
    row = _abandon(late_stack, key, stream=True, read_until=b'"done":false', wait_s=0)
    assert row["bytes_out"] > 0
    assert row["prompt_tokens"] > 0  # estimated like any stream's
    assert 1 <= row["completion_tokens"] < _OUTPUT_CAP // 2
    assert row["usage_source"] == "estimated"


def test_a_non_streamed_request_dropped_while_generating_pays_its_estimate(
    late_stack: Stack,
) -> None:
    """Client gone 1.5 s into a non-streamed reply: charged its prompt plus generation
    for the time it ran (at the stated rate), not the whole reservation."""
    key = make_key(late_stack, name="patient")
    row = _abandon(late_stack, key, stream=False, read_until=None, wait_s=1.5)
    assert row["status"] == 499
    prompt = row["reserved_tokens"] - _OUTPUT_CAP
    assert row["prompt_tokens"] == prompt
    generated = math.ceil(row["duration_ms"] / 1000 * ABORTED_TOKENS_PER_S)
    assert row["completion_tokens"] == min(_OUTPUT_CAP, generated)
    assert row["prompt_tokens"] + row["completion_tokens"] <= row["reserved_tokens"]
    assert row["usage_source"] == "estimated"

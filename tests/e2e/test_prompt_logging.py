"""Prompt logging through the gateway: Ollama gets the client's bytes; the log keeps them."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from compose.local.parts import Stack
from tests.e2e.conftest import StandinLog, make_key
from tests.e2e.test_admission import set_limits
from tests.e2e.test_metering import _rows, audit_rows

_CASES: list[tuple[str, dict[str, Any]]] = [
    ("/api/chat", {"model": "llama3.2", "messages": [{"role": "user", "content": "Rivers, é ✓"}]}),
    ("/api/generate", {"model": "llama3.2", "prompt": "Lakes {http.request.uuid} {$HOME}"}),
    (
        "/v1/chat/completions",
        {"model": "llama3.2", "messages": [{"role": "user", "content": "Tell me about seas."}]},
    ),
    ("/v1/completions", {"model": "llama3.2", "prompt": "Once upon a time"}),
    ("/api/embed", {"model": "all-minilm", "input": ["one", "two"]}),
]


def _send(gateway: str, key: str, path: str, raw: bytes) -> str:
    with httpx.stream(
        "POST",
        f"{gateway}{path}",
        content=raw,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=30,
    ) as reply:
        text = reply.read()
        assert reply.status_code == 200, (path, text)
        assert text.strip(), path
        return reply.headers["x-request-id"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_prompt_logging_round_trips_with_unchanged_upstream_bodies(
    stack: Stack, gateway: str, standin_log: StandinLog, stream: bool
) -> None:
    """With prompt logging on, every surface answers normally, Ollama receives exactly the
    body it receives without prompt logging (policyd's normalised body; compared by hash at
    the stand-in), and the prompt log holds the bytes the client sent."""
    logged = make_key(stack, name=f"logged-{int(stream)}")
    plain = make_key(stack, name=f"plain-{int(stream)}")
    set_limits(stack, key=logged[:11], prompt_logging=True, prompt_retention_days=3)
    sent: dict[str, bytes] = {}
    pairs: list[tuple[str, str]] = []
    for path, body in _CASES:
        if path != "/api/embed":
            body = {**body, "stream": stream}
        # Odd spacing on purpose: the client's bytes, not a re-serialisation, are stored.
        raw = json.dumps(body, indent=1, ensure_ascii=False).encode()
        with_log = _send(gateway, logged, path, raw)
        sent[with_log] = raw
        pairs.append((with_log, _send(gateway, plain, path, raw)))
    received = {r["request_id"]: r for r in standin_log.requests()}
    for with_log, without in pairs:
        assert received[with_log]["body_size"] > 0
        assert received[with_log]["body_sha256"] == received[without]["body_sha256"]
        assert received[with_log]["body_size"] == received[without]["body_size"]
    rows = audit_rows(stack, list(sent))
    assert all(row["status"] == 200 for row in rows.values())
    stored = asyncio.run(
        _rows(
            stack,
            "SELECT request_id::text AS id, body, expires_at - stored_at AS keep FROM prompt_log "
            "WHERE request_id::text = ANY(:ids)",
            ids=list(sent),
        )
    )
    assert {r["id"]: r["body"].encode() for r in stored} == sent
    for row in stored:
        assert abs(row["keep"].total_seconds() - 3 * 86400) < 120

"""Probes and failure modes: /healthz, /readyz, and failing closed when a part is down."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import httpx

from compose.local.parts import Stack
from compose.local.services import Service, StandinServer
from tests.e2e.conftest import StandinLog, make_key

__all__: list[str] = []

SURFACES: Final = ("/api/chat", "/v1/chat/completions")
#: policyd's store timeout is 2 s; a refusal must come well before a client would give up.
_FAIL_CLOSED_S: Final = 5.0


def chat(gateway: str, path: str, key: str) -> httpx.Response:
    """A small non-streamed chat request with `key`."""
    body: dict[str, Any] = {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": False,
    }
    if path.startswith("/v1/"):
        body["max_tokens"] = 3
    else:
        body["options"] = {"num_predict": 3}
    return httpx.post(
        f"{gateway}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


def readyz(gateway: str) -> httpx.Response:
    """GET /readyz without a key."""
    return httpx.get(f"{gateway}/readyz", timeout=10)


@contextmanager
def stopped(stack: Stack, service: Service[Any]) -> Iterator[None]:
    """Stop one part for the block; restart it (and wait for /readyz) even if the block fails."""
    service.stop()
    try:
        yield
    finally:
        stack.ensure_running()


def assert_unavailable(reply: httpx.Response, path: str) -> None:
    """A fail-closed 503 in the surface's format that tells the client when to retry."""
    assert reply.status_code == 503, (path, reply.status_code, reply.text)
    assert reply.headers["x-nz-refusal"] == "service_unavailable"
    assert int(reply.headers["retry-after"]) >= 1
    error = reply.json()["error"]
    if path.startswith("/v1/"):
        assert error["code"] == "service_unavailable"
        assert error["type"] == "api_error"
        assert error["message"]
    else:
        assert isinstance(error, str)
        assert error


def first_unavailable(gateway: str, path: str, key: str) -> httpx.Response:
    """Send until the gateway answers 503; each answer and the whole wait are bounded."""
    deadline = time.monotonic() + _FAIL_CLOSED_S
    while True:
        started = time.monotonic()
        reply = chat(gateway, path, key)
        assert time.monotonic() - started < _FAIL_CLOSED_S, "the refusal took too long"
        if reply.status_code == 503:
            return reply
        assert time.monotonic() < deadline, (path, reply.status_code, reply.text)
        time.sleep(0.1)


def model_requests(standin_log: StandinLog) -> list[str]:
    """Paths of the requests that reached the stand-in, without /readyz's version probes."""
    return [r["raw_path"] for r in standin_log.requests() if r["raw_path"] != "/api/version"]


def down_parts(reply: httpx.Response) -> list[str]:
    """The parts a 503 /readyz names as down."""
    assert reply.status_code == 503, reply.text
    down: list[str] = reply.json()["down"]
    return down


def standin(stack: Stack) -> Service[StandinServer]:
    """The stack's stand-in (these tests need one to stop)."""
    assert stack.standin is not None, "this test needs the stand-in, not a real Ollama"
    return stack.standin


def test_healthz_is_ok_without_a_key(gateway: str) -> None:
    """/healthz answers 200 {"status":"ok"} to anyone, without an API key."""
    reply = httpx.get(f"{gateway}/healthz", timeout=10)
    assert reply.status_code == 200
    assert reply.json() == {"status": "ok"}
    assert reply.headers["content-type"].startswith("application/json")


def test_readyz_is_ok_when_everything_is_up(gateway: str) -> None:
    """/readyz is 200 without a key when Postgres, Redis and Ollama all answer."""
    reply = readyz(gateway)
    assert reply.status_code == 200, reply.text
    assert reply.json()["checks"] == {"postgres": "ok", "redis": "ok", "ollama": "ok"}


def test_readyz_names_ollama_when_the_upstream_is_down(stack: Stack, gateway: str) -> None:
    """With the stand-in stopped, /readyz is 503 and names `ollama` (and nothing else)."""
    with stopped(stack, standin(stack)):
        reply = readyz(gateway)
        assert down_parts(reply) == ["ollama"]
        assert "ollama" in reply.text
    assert readyz(gateway).status_code == 200


def test_redis_down_fails_closed(
    stack: Stack, gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """With Redis stopped, /readyz names redis and a valid (cached) key gets a prompt 503."""
    for path in SURFACES:
        assert chat(gateway, path, api_key).status_code == 200
    standin_log.clear()
    with stopped(stack, stack.redis):
        assert down_parts(readyz(gateway)) == ["redis"]
        for path in SURFACES:
            assert_unavailable(first_unavailable(gateway, path, api_key), path)
            # Not a fluke: it stays closed while Redis is away.
            assert_unavailable(chat(gateway, path, api_key), path)
        assert model_requests(standin_log) == []
    for path in SURFACES:
        reply = chat(gateway, path, api_key)
        assert reply.status_code == 200, (path, reply.text)


def test_postgres_down_keeps_cached_keys_and_refuses_new_ones(
    stack: Stack, gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """Postgres stopped: /readyz names postgres, a cached key passes, an uncached one gets 503."""
    assert chat(gateway, SURFACES[0], api_key).status_code == 200
    uncached = make_key(stack, name="never-used")
    standin_log.clear()
    with stopped(stack, stack.postgres):
        assert down_parts(readyz(gateway)) == ["postgres"]
        for path in SURFACES:
            reply = chat(gateway, path, api_key)
            assert reply.status_code == 200, (path, reply.status_code, reply.text)
            assert_unavailable(first_unavailable(gateway, path, uncached), path)
        assert model_requests(standin_log) == list(SURFACES)
    reply = chat(gateway, SURFACES[1], uncached)
    assert reply.status_code == 200, reply.text


def test_policyd_down_is_a_502_never_an_allow(
    stack: Stack, gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """With policyd stopped, Caddy answers 502 for model requests and probes; nothing goes up."""
    assert chat(gateway, SURFACES[0], api_key).status_code == 200
    standin_log.clear()
    with stopped(stack, stack.policyd):
        for path in SURFACES:
            reply = chat(gateway, path, api_key)
            assert reply.status_code == 502, (path, reply.status_code, reply.text)
        assert httpx.get(f"{gateway}/api/tags", timeout=10).status_code == 502
        assert readyz(gateway).status_code == 502
        assert model_requests(standin_log) == []
    assert chat(gateway, SURFACES[1], api_key).status_code == 200

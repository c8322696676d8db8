"""`/__standin/*`: the request log and armed mid-stream failures."""

from __future__ import annotations

import hashlib
import json

import httpx

from tests.standin.conftest import Standin, raw_request

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


def _arm(standin: Standin, **options: int) -> None:
    response = httpx.post(f"{standin.url}/__standin/fail", json=options, timeout=5)
    assert response.status_code == 200


def test_requests_are_recorded(fresh: Standin) -> None:
    """Method, raw and decoded path, query, lower-cased headers, body hash and request id."""
    body = b'{"model":"llama3.2","prompt":""}'
    raw_request(
        fresh.url,
        "POST",
        "/api/%67enerate?trace=1",
        headers={"X-Request-Id": "req-42", "X-Custom-Header": "Yes"},
        body=body,
    )
    [record] = fresh.requests()
    assert record["method"] == "POST"
    assert record["raw_path"] == "/api/%67enerate"
    assert record["path"] == "/api/generate"
    assert record["query"] == "trace=1"
    assert record["headers"]["x-custom-header"] == "Yes"
    assert record["request_id"] == "req-42"
    assert record["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert record["body_size"] == len(body)
    assert record["status"] == 200


def test_log_can_be_cleared_and_skips_introspection(fresh: Standin) -> None:
    """DELETE empties the log; /__standin/ calls themselves are never logged."""
    httpx.get(f"{fresh.url}/api/version", timeout=5)
    assert len(fresh.requests()) == 1
    assert httpx.delete(f"{fresh.url}/__standin/requests", timeout=5).status_code == 204
    assert fresh.requests() == []


def test_mutations_answer_and_are_recorded(fresh: Standin) -> None:
    """Pull streams progress; every mutation attempt shows up in the log."""
    pull = httpx.post(f"{fresh.url}/api/pull", json={"model": "llama3.2"}, timeout=5)
    assert [json.loads(line)["status"] for line in pull.text.splitlines()][-1] == "success"
    delete = httpx.request("DELETE", f"{fresh.url}/api/delete", json={"model": "llama3.2"})
    assert (delete.status_code, delete.content) == (200, b"")
    copy = httpx.post(f"{fresh.url}/api/copy", json={"source": "x", "destination": "y"})
    assert copy.json() == {"error": 'model "x" not found'}
    assert [r["path"] for r in fresh.requests()] == ["/api/pull", "/api/delete", "/api/copy"]


def test_native_stream_fails_mid_stream(fresh: Standin) -> None:
    """After N tokens the stream ends with Ollama's error line and no done:true, status 200."""
    _arm(fresh, after_tokens=3)
    response = httpx.post(f"{fresh.url}/api/chat", json=CHAT, timeout=5)
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert response.status_code == 200
    assert [line.get("done") for line in lines[:3]] == [False, False, False]
    assert lines[3:] == [{"error": "an error was encountered while running the model"}]
    assert fresh.requests()[-1]["tokens_sent"] == 3


def test_openai_stream_fails_without_done(fresh: Standin) -> None:
    """On /v1 the failure shows as an empty delta and the stream ends without [DONE]."""
    _arm(fresh, after_tokens=2)
    response = httpx.post(
        f"{fresh.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=5
    )
    events = response.content.split(b"\n\n")
    assert events[-1] == b""
    assert b"[DONE]" not in response.content
    last = json.loads(events[-2].removeprefix(b"data: "))
    assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": None}]
    assert len(events) - 1 == 3


def test_failure_before_first_token_sets_the_status(fresh: Standin) -> None:
    """Failing before any chunk answers 500 with a JSON error; failures are used up in order."""
    _arm(fresh, after_tokens=0, times=2)
    stream = httpx.post(f"{fresh.url}/api/chat", json=CHAT, timeout=5)
    assert stream.status_code == 500
    assert stream.headers["content-type"] == "application/json"
    assert stream.json() == {"error": "an error was encountered while running the model"}
    whole = httpx.post(f"{fresh.url}/v1/chat/completions", json=CHAT, timeout=5)
    assert whole.status_code == 500
    assert whole.json()["error"]["type"] == "api_error"
    assert httpx.post(f"{fresh.url}/api/chat", json=CHAT, timeout=5).status_code == 200

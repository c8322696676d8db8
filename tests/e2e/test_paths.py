"""Only allowlisted, canonical paths reach Ollama; mutation endpoints never do."""

from __future__ import annotations

from tests.e2e.conftest import StandinLog
from tests.e2e.wire import raw_request

MUTATIONS = [
    ("POST", "/api/pull"),
    ("POST", "/api/push"),
    ("POST", "/api/create"),
    ("POST", "/api/copy"),
    ("DELETE", "/api/delete"),
    ("POST", "/api/blobs/sha256:0123"),
    ("HEAD", "/api/blobs/sha256:0123"),
    ("POST", "/API/PULL"),
    ("POST", "/api/Pull"),
    ("POST", "/api/pull/"),
    ("POST", "/api//pull"),
    ("POST", "//api/pull"),
    ("POST", "/api/%70ull"),
    ("POST", "/api%2Fpull"),
    ("POST", "/api/pull%2F"),
    ("POST", "/./api/pull"),
    ("POST", "/api/./pull"),
    ("POST", "/api/x/../pull"),
    ("POST", "/api/x/%2e%2e/pull"),
    ("POST", "/api/pull/.."),
    ("POST", "/api/pull;x"),
    ("POST", "/api/pull."),
    ("POST", "/api/pull%00"),
    ("POST", "/api/pull%3Fx"),
    ("POST", "/api\\pull"),
    ("POST", "/api/pull?x=1"),
    ("POST", "/api/%63reate"),
    ("DELETE", "/api/DELETE"),
]


def test_mutation_endpoints_are_forbidden_even_with_a_valid_key(
    gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """Every spelling of a mutation endpoint is 403 in Ollama's format and never reaches it."""
    for method, target in MUTATIONS:
        reply = raw_request(
            gateway,
            method,
            target,
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
            body=b'{"model":"llama3.2"}' if method != "HEAD" else b"",
        )
        assert reply.status == 403, (target, reply.status, reply.body)
        if method != "HEAD":
            assert "forbidden path" in reply.json()["error"], target
    assert standin_log.requests() == []


NON_CANONICAL = [
    "/api/chat/",
    "/api//chat",
    "/api/%63hat",
    "/api/./chat",
    "/api/x/../chat",
    "/api/chat;x",
    "/API/chat",
]


def test_non_canonical_spellings_of_allowed_paths_are_refused(
    gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """Ollama would route most of these to chat; the gateway refuses instead of normalising."""
    for target in NON_CANONICAL:
        reply = raw_request(
            gateway,
            "POST",
            target,
            headers={"Authorization": f"Bearer {api_key}"},
            body=b'{"model":"llama3.2","messages":[]}',
        )
        assert reply.status in (403, 404), target
    assert standin_log.requests() == []


REFUSED = [
    ("POST", "/v1/responses", 404),
    ("POST", "/v1/messages", 404),
    ("GET", "/api/status", 404),
    ("POST", "/api/experimental/web_search", 404),
    ("GET", "/__standin/requests", 404),
    ("GET", "/", 404),
    ("POST", "/api/tags", 405),
    ("GET", "/api/chat", 405),
    ("POST", "/v1/models", 405),
]


def test_unknown_paths_and_wrong_methods_are_refused(
    gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """Anything outside the allowlist is refused, with its surface's error format."""
    for method, target, status in REFUSED:
        reply = raw_request(
            gateway, method, target, headers={"Authorization": f"Bearer {api_key}"}, body=b"{}"
        )
        assert reply.status == status, target
        error = reply.json()["error"]
        if target.startswith("/v1/"):
            assert error["type"] in ("not_found_error", "invalid_request_error"), target
        else:
            assert isinstance(error, str), target
        if status == 405:
            assert reply.headers["allow"]
    assert standin_log.requests() == []

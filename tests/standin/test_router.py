"""gin/ServeMux routing behaviour: 404, 405, redirects, decoded paths, Host and CORS checks."""

from __future__ import annotations

import pytest

from tests.standin.conftest import Standin, raw_request

TEXT = "text/plain"


@pytest.mark.parametrize(
    ("method", "target", "status", "body", "allow"),
    [
        ("POST", "/API/chat", 404, b"404 page not found", None),  # paths are case-sensitive
        ("GET", "/api/nothing", 404, b"404 page not found", None),
        ("GET", "/api/chat", 405, b"405 method not allowed", "POST"),
        ("PUT", "/api/tags", 405, b"405 method not allowed", "HEAD, GET"),
        ("HEAD", "/api/ps", 405, b"", "GET"),  # HEAD is not mapped to GET
        ("GET", "/api/blobs/sha256:x", 405, b"405 method not allowed", "HEAD, POST"),
        ("OPTIONS", "/api/chat", 405, b"405 method not allowed", "POST"),  # no Origin
        ("GET", "/api/chat/", 404, b"404 page not found", None),  # no GET route to slash-fix
    ],
)
def test_not_found_and_method_not_allowed(
    fresh: Standin, method: str, target: str, status: int, body: bytes, allow: str | None
) -> None:
    """gin's plain-text 404 and 405 (with Allow in registration order)."""
    response = raw_request(fresh.url, method, target)
    assert response.status == status
    assert response.body == body
    assert response.header("content-type") == TEXT
    assert response.header("allow") == allow


@pytest.mark.parametrize(
    ("method", "target", "status", "location"),
    [
        ("POST", "/api/chat/", 307, "/api/chat"),
        ("GET", "/api/tags/?verbose=1", 301, "/api/tags?verbose=1"),
        ("HEAD", "/api/version/", 307, "/api/version"),
        ("GET", "/v1/models/llama3.2/", 301, "/v1/models/llama3.2"),
        ("GET", "//api/tags", 301, "/api/tags"),  # ServeMux cleans before gin
        ("POST", "/api/../api/chat", 301, "/api/chat"),
    ],
)
def test_redirects(fresh: Standin, method: str, target: str, status: int, location: str) -> None:
    """Trailing slashes redirect (307 unless GET); unclean paths get ServeMux's 301."""
    response = raw_request(fresh.url, method, target, headers={"Host": "evil.example"})
    assert response.status == status  # redirects happen before the Host check
    assert response.header("location") == location
    if method == "GET":
        assert response.header("content-type") == "text/html; charset=utf-8"
        assert response.body == f'<a href="{location}">Moved Permanently</a>.\n\n'.encode()


def test_malformed_escape_is_a_bad_request(fresh: Standin) -> None:
    """A `%` without two hex digits fails Go's URL parsing: plain 400, connection closed."""
    response = raw_request(fresh.url, "POST", "/api/%zzchat")
    assert response.status == 400
    assert response.body == b"400 Bad Request"
    assert response.header("connection") == "close"


def test_routing_uses_the_decoded_path(fresh: Standin) -> None:
    """`/api/%63hat` is chat and `/api%2Fpull` is pull; the raw target is recorded too."""
    chat = raw_request(fresh.url, "POST", "/api/%63hat", body=b'{"model":"llama3.2"}')
    assert chat.status == 200
    assert b'"done_reason":"load"' in chat.body
    pull = raw_request(fresh.url, "POST", "/api%2Fpull", body=b'{"model":"llama3.2"}')
    assert pull.status == 200
    assert pull.body.endswith(b'{"status":"success"}\n')
    records = [(r["raw_path"], r["path"]) for r in fresh.requests()]
    assert records == [("/api/%63hat", "/api/chat"), ("/api%2Fpull", "/api/pull")]


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("evil.example", 403),
        ("evil.example:11434", 403),
        ("localhost:11434", 200),
        ("LOCALHOST", 200),
        ("ollama.internal:80", 200),
        ("box.local", 200),
        ("10.1.2.3:8080", 200),
        ("[::1]:11434", 200),
        ("[::1]", 403),  # Go's SplitHostPort fails, the bracketed string is no IP or name
        ("8.8.8.8", 403),
    ],
)
def test_host_check(fresh: Standin, host: str, status: int) -> None:
    """On loopback, only local Hosts pass; others get 403 with an empty body."""
    response = raw_request(fresh.url, "GET", "/api/version", headers={"Host": host})
    assert response.status == status
    if status == 403:
        assert response.body == b""
        assert response.header("content-type") is None


def test_host_check_runs_before_404(fresh: Standin) -> None:
    """The middleware also guards unknown paths: a bad Host gets 403, not 404."""
    response = raw_request(fresh.url, "GET", "/nowhere", headers={"Host": "evil.example"})
    assert response.status == 403


def test_cors(fresh: Standin) -> None:
    """Foreign origins are refused; local ones get preflight answers and Allow-Origin."""
    evil = raw_request(fresh.url, "POST", "/api/chat", headers={"Origin": "https://evil.example"})
    assert evil.status == 403
    origin = {"Origin": "http://localhost:3000"}
    preflight = raw_request(fresh.url, "OPTIONS", "/api/chat", headers=origin)
    assert preflight.status == 204
    assert preflight.header("access-control-allow-origin") == "http://localhost:3000"
    assert preflight.header("access-control-max-age") == "43200"
    normal = raw_request(fresh.url, "GET", "/api/version", headers=origin)
    assert normal.status == 200
    assert normal.header("access-control-allow-origin") == "http://localhost:3000"
    assert normal.header("vary") == "Origin"


def test_root_and_head(fresh: Standin) -> None:
    """GET / says Ollama is running; HEAD / has the same headers and no body."""
    get = raw_request(fresh.url, "GET", "/")
    assert (get.status, get.body) == (200, b"Ollama is running")
    assert get.header("content-type") == "text/plain; charset=utf-8"
    head = raw_request(fresh.url, "HEAD", "/")
    assert head.status == 200
    assert head.body == b""
    assert head.header("content-length") == "17"

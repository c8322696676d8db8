"""Hostile clients through the real Caddy: refusals stay cheap and say nothing extra.

No timings are asserted: policyd's /statsz counters show what work was (not) done.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from compose.local.parts import Stack
from compose.local.processes import ProcessHandle
from compose.local.services import CaddyServer
from tests.e2e.conftest import StandinLog, make_key
from tests.e2e.hostile import counters, other_secret, unknown_prefix_key

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
#: Just under the gateway's 8 MiB body limit: 2.8 M empty JSON objects. Caddy asks
#: policyd about the key before reading a body this large.
JUNK = b"[" + b"{}," * 2_796_000 + b"{}]"
#: Under the 100 kB Caddy reads without asking first: policyd gets it, but only its key
#: is checked.
SMALL_JUNK = b"[" + b"{}," * 30_000 + b"{}]"
#: The read timeouts of the slow-upload Caddy (seconds).
SHORT_READ_S = 2
#: How long a slow-upload client keeps trickling before it gives up on the server.
GIVE_UP_S = 20
BUDGET = 10  # policyd's default NZ_AUTH_FAILURE_BUDGET
CLIENT_BUDGET = 30  # policyd's default NZ_AUTH_TARPIT_CLIENT_BUDGET


def post(gateway: str, key: str, path: str = "/api/chat", **kwargs: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{gateway}{path}", headers=headers, timeout=60, **kwargs)  # type: ignore[arg-type]


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in after}


@pytest.mark.parametrize("junk", [JUNK, SMALL_JUNK], ids=["8MiB", "90kB"])
@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_invalid_key_with_a_junk_body_is_refused_without_parsing_it(
    stack: Stack, gateway: str, api_key: str, path: str, junk: bytes, standin_log: StandinLog
) -> None:
    """A wrong secret with megabytes of `{}` gets the caller's 401; policyd never parses it."""
    before = counters(stack.policyd_socket)
    reply = post(gateway, other_secret(api_key), path, content=junk)
    assert reply.status_code == 401, reply.text[:200]
    assert reply.headers["x-nz-refusal"] == "invalid_api_key"
    error = reply.json()["error"]
    if path.startswith("/v1/"):
        assert error["code"] == "invalid_api_key"
        assert error["type"] == "authentication_error"
    else:
        assert error == "invalid API key"
    assert delta(before, counters(stack.policyd_socket))["bodies_screened"] == 0
    # The same body with the valid key is parsed (and refused as junk): the counter counts.
    reply = post(gateway, api_key, path, content=junk)
    assert reply.status_code == 400, reply.text[:200]
    assert delta(before, counters(stack.policyd_socket))["bodies_screened"] == 1
    assert standin_log.requests() == []


def test_a_repeated_wrong_secret_reaches_argon2_once(
    stack: Stack, gateway: str, api_key: str
) -> None:
    """The same wrong secret for a known, uncached prefix is hashed once, then remembered."""
    wrong = other_secret(api_key)
    before = counters(stack.policyd_socket)
    for _ in range(5):
        reply = post(gateway, wrong, json=CHAT)
        assert reply.status_code == 401
        assert reply.headers["x-nz-refusal"] == "invalid_api_key"
    spent = delta(before, counters(stack.policyd_socket))
    assert spent["argon2_runs"] == 1
    assert spent["auth_failures_remembered"] == 4


def _flood_until_over_budget(stack: Stack, gateway: str, key: str) -> dict[str, int]:
    """Distinct wrong secrets for `key`'s prefix until policyd refuses them over budget."""
    before = counters(stack.policyd_socket)
    for _ in range(200):
        reply = post(gateway, other_secret(key), json=CHAT)
        assert reply.status_code in (401, 429), reply.text
        if delta(before, counters(stack.policyd_socket))["auth_failures_over_budget"] > 0:
            return delta(before, counters(stack.policyd_socket))
        if reply.status_code == 429:
            # The suspect lane's token bucket: wait for the next token.
            time.sleep(float(reply.headers["retry-after"]) / 4)
    raise AssertionError("the failure budget never ran out")


def test_a_flooded_prefix_stops_reaching_argon2_and_others_keep_their_lane(
    stack: Stack, gateway: str, api_key: str
) -> None:
    """After the budget, wrong secrets cost no Argon2; another key's first use still verifies."""
    spent = _flood_until_over_budget(stack, gateway, api_key)
    assert spent["argon2_runs"] == BUDGET
    before = counters(stack.policyd_socket)
    for path in ("/api/chat", "/v1/chat/completions"):
        for _ in range(5):
            reply = post(gateway, other_secret(api_key), path, json=CHAT)
            assert reply.status_code == 429
            assert reply.headers["x-nz-refusal"] == "api_key_verification_throttled"
            assert 1 <= int(reply.headers["retry-after"]) <= 60
            if path.startswith("/v1/"):
                assert reply.json()["error"]["type"] == "rate_limit_error"
            else:
                assert isinstance(reply.json()["error"], str)
    assert delta(before, counters(stack.policyd_socket))["argon2_runs"] == 0
    # A valid key of another prefix, never seen before, verifies in the clean lane.
    fresh = make_key(stack, name="bystander")
    assert post(gateway, fresh, json=CHAT).status_code == 200
    assert delta(before, counters(stack.policyd_socket))["argon2_runs"] == 1


def test_the_locked_prefix_refuses_its_own_uncached_key_for_the_window(
    stack: Stack, gateway: str, api_key: str
) -> None:
    """The documented price: an uncached valid key of a flooded prefix waits out the window."""
    _flood_until_over_budget(stack, gateway, api_key)
    reply = post(gateway, api_key, json=CHAT)
    assert reply.status_code == 429
    assert reply.headers["x-nz-refusal"] == "api_key_verification_throttled"


def _answer(reply: httpx.Response) -> tuple[int, bytes, list[str]]:
    names = sorted(n for n in reply.headers if n not in {"x-request-id", "date", "content-length"})
    return reply.status_code, reply.content, names


def test_an_unknown_prefix_is_refused_like_a_known_one(
    stack: Stack, gateway: str, api_key: str
) -> None:
    """Same answers for a known and an unknown prefix; the unknown one is padded, not hashed."""
    known, unknown = other_secret(api_key), unknown_prefix_key()
    before = counters(stack.policyd_socket)
    first_known = post(gateway, known, json=CHAT)
    after_known = counters(stack.policyd_socket)
    first_unknown = post(gateway, unknown, json=CHAT)
    after_unknown = counters(stack.policyd_socket)
    assert _answer(first_known) == _answer(first_unknown)
    assert first_known.status_code == 401
    assert delta(before, after_known)["argon2_runs"] == 1
    assert delta(after_known, after_unknown)["argon2_runs"] == 0
    assert delta(after_known, after_unknown)["argon2_pads"] == 1
    # Seen once, both are remembered: no hash, no pad.
    assert _answer(post(gateway, known, json=CHAT)) == _answer(post(gateway, unknown, json=CHAT))
    spent = delta(after_unknown, counters(stack.policyd_socket))
    assert (spent["argon2_runs"], spent["argon2_pads"], spent["auth_failures_remembered"]) == (
        0,
        0,
        2,
    )


# --- slow uploads ---------------------------------------------------------------------------


@pytest.fixture
def impatient_gateway(stack: Stack, tmp_path: Path) -> Iterator[str]:
    """A second Caddy on the session stack's policyd and stand-in, with 2 s read timeouts."""
    caddy = stack.caddy.launcher
    impatient = CaddyServer(
        caddyfile=caddy.caddyfile,
        log_dir=tmp_path / "log",
        state_dir=tmp_path / "caddy",
        settings={
            **caddy.settings,
            "NZ_ACCESS_LOG": str(tmp_path / "access.log"),
            "NZ_READ_BODY_TIMEOUT": f"{SHORT_READ_S}s",
            "NZ_READ_HEADER_TIMEOUT": f"{SHORT_READ_S}s",
        },
    )
    handle: ProcessHandle = impatient.start()
    try:
        yield impatient.url
    finally:
        handle.stop(timeout=10)


def _slow_upload(
    url: str, headers: str, *, path: str = "/api/chat", length: int = 1_000_000
) -> tuple[bytes, int, bool]:
    """Send headers, then one body byte per 0.25 s until the server hangs up.

    Returns what the server sent, how many body bytes it took, and whether it closed the
    connection (rather than the client giving up after GIVE_UP_S).
    """
    host, port = url.removeprefix("http://").split(":")
    head = f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Length: {length}\r\n{headers}\r\n"
    received = b""
    sent = 0
    closed = False
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode())
        sock.settimeout(0.25)
        give_up = time.monotonic() + GIVE_UP_S
        while sent < length and time.monotonic() < give_up:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                chunk = None
            except ConnectionResetError:
                closed = True
                break
            if chunk == b"":
                closed = True
                break
            if chunk:
                received += chunk
                continue
            try:
                sock.sendall(b" ")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sent += 1
    return received, sent, closed


def _one_response(received: bytes) -> tuple[str, dict[str, str], bytes]:
    """The status line, headers (lower-cased names) and body of the only response sent."""
    head, _, rest = received.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines)
    names = {name.lower(): value for name, value in fields.items()}
    length = int(names["content-length"])
    # Nothing after the body: no second response to bytes read as a next request.
    assert len(rest) == length, received
    return status, names, rest


@pytest.mark.parametrize(
    ("path", "length", "key"),
    [
        # Over 100 kB: policyd checks the key first, then Caddy reads the body.
        ("/api/chat", 1_000_000, "valid"),
        ("/v1/chat/completions", 1_000_000, "valid"),
        # Under 100 kB with a key-shaped token: read straight away, valid key or not.
        ("/api/chat", 50_000, "valid"),
        ("/v1/chat/completions", 50_000, "wrong secret"),
    ],
)
def test_a_slow_upload_with_a_key_shaped_token_is_cut_off(
    stack: Stack,
    impatient_gateway: str,
    api_key: str,
    standin_log: StandinLog,
    tmp_path: Path,
    path: str,
    length: int,
    key: str,
) -> None:
    """One byte at a time: once Caddy's read_body deadline passes, the client gets a 408
    in its API's format and the connection is closed; nothing is admitted or parsed."""
    token = api_key if key == "valid" else other_secret(api_key)
    before = counters(stack.policyd_socket)
    received, sent, closed = _slow_upload(
        impatient_gateway, f"Authorization: Bearer {token}\r\n", path=path, length=length
    )
    # Caddy answered and hung up at the deadline (2 s, ~8 bytes), long before the body
    # was complete, whether the rest of the declared body was large or small.
    assert closed
    assert sent < 4 * SHORT_READ_S * 3
    status, headers, body = _one_response(received)
    assert status == "HTTP/1.1 408 Request Timeout"
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert headers["x-nz-refusal"] == "request_timeout"
    assert headers["x-request-id"]
    error = json.loads(body)["error"]
    message = f"request timeout: the request did not arrive in full within {SHORT_READ_S}s"
    if path.startswith("/v1/"):
        assert error == {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": "request_timeout",
        }
    else:
        assert error == message
    # The audit sees it as what the client got (meterd records the refusal code).
    (line,) = [json.loads(raw) for raw in (tmp_path / "access.log").read_text().splitlines()]
    assert line["status"] == 408
    assert line["resp_headers"]["X-Nz-Refusal"] == ["request_timeout"]
    assert delta(before, counters(stack.policyd_socket))["bodies_screened"] == 0
    assert standin_log.requests() == []


@pytest.mark.parametrize(
    ("auth", "refusal"),
    [
        (None, b"missing API key"),
        ("Basic dXNlcjpwYXNz", b"missing API key"),
        ("Bearer nz_not_a_key", b"malformed API key"),
        ("wrong secret", b"invalid API key"),
    ],
)
def test_a_large_upload_without_a_valid_key_is_refused_before_its_body_is_read(
    stack: Stack,
    gateway: str,
    api_key: str,
    auth: str | None,
    refusal: bytes,
    standin_log: StandinLog,
) -> None:
    """Without a valid key the 401 comes once 300 kB of the announced megabyte are sent,
    long before the 30 s read deadline: Caddy never waited for the body to buffer it (Go
    reads at most 256 KiB of an unread body before answering, then hangs up)."""
    host, port = gateway.removeprefix("http://").split(":")
    if auth == "wrong secret":
        auth = f"Bearer {other_secret(api_key)}"
    headers = "" if auth is None else f"Authorization: {auth}\r\n"
    head = f"POST /api/chat HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000000\r\n{headers}\r\n"
    before = counters(stack.policyd_socket)
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head.encode() + b" " * 300_000)
        received = sock.recv(65536)
        head_part, _, body = received.partition(b"\r\n\r\n")
        assert head_part.startswith(b"HTTP/1.1 401 ")
        length = int(
            next(
                line
                for line in head_part.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ).split(b":")[1]
        )
        while len(body) < length:
            body += sock.recv(65536)
    assert refusal in body
    assert delta(before, counters(stack.policyd_socket))["bodies_screened"] == 0
    assert standin_log.requests() == []


def _prompt(size: int) -> dict[str, object]:
    return {**CHAT, "messages": [{"role": "user", "content": "a" * size}]}


def test_a_valid_key_with_odd_spacing_or_a_chunked_body_reaches_ollama_whole(
    stack: Stack, gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """Large and chunked bodies of a valid key (odd spacing too) pass the key check and
    reach Ollama whole."""
    body = json.dumps(_prompt(200_000)).encode()

    def chunks() -> Iterator[bytes]:
        yield from (body[i : i + 65536] for i in range(0, len(body), 65536))

    for auth in (f"Bearer {api_key}", f"bearer   {api_key}"):
        headers = {"Authorization": auth}
        for content in (body, chunks()):
            reply = httpx.post(f"{gateway}/api/chat", headers=headers, content=content, timeout=60)
            assert reply.status_code == 200, reply.text
    # Ollama gets policyd's canonical re-serialisation: the same bytes all four times,
    # the 200 kB prompt included.
    sizes = [r["body_size"] for r in standin_log.requests() if r["raw_path"] == "/api/chat"]
    assert len(sizes) == 4
    assert len(set(sizes)) == 1
    assert sizes[0] > 200_000


def _from(
    source: str, gateway: str, key: str | None, headers: dict[str, str] | None = None
) -> httpx.Response:
    """A chat sent from the loopback address `source`: Caddy's client_ip for it."""
    headers = dict(headers or {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=60) as client:
        return client.post(f"{gateway}/api/chat", headers=headers, json=CHAT)


def test_a_repeated_wrong_secret_waits_for_its_refusal(
    stack: Stack, gateway: str, api_key: str
) -> None:
    """The first failure is answered at once; the same wrong secret again is held back."""
    wrong = unknown_prefix_key()
    before = counters(stack.policyd_socket)
    assert _from("127.0.0.21", gateway, wrong).status_code == 401
    assert delta(before, counters(stack.policyd_socket))["auth_refusals_held"] == 0
    reply = _from("127.0.0.21", gateway, wrong)
    assert reply.status_code == 401
    assert reply.headers["x-nz-refusal"] == "invalid_api_key"
    assert delta(before, counters(stack.policyd_socket))["auth_refusals_held"] == 1
    # The same client's valid key is never held.
    assert _from("127.0.0.21", gateway, api_key).status_code == 200
    assert delta(before, counters(stack.policyd_socket))["auth_refusals_held"] == 1


def test_a_client_past_its_failure_budget_waits_for_every_refusal(
    stack: Stack, gateway: str, api_key: str
) -> None:
    """Past NZ_AUTH_TARPIT_CLIENT_BUDGET failures, even first-time failures of that client
    are held; another client's are not, and the failing client's valid key still passes."""
    before = counters(stack.policyd_socket)
    for _ in range(CLIENT_BUDGET):
        assert _from("127.0.0.22", gateway, None).status_code == 401
    assert delta(before, counters(stack.policyd_socket))["auth_refusals_held"] == 0
    reply = _from("127.0.0.22", gateway, unknown_prefix_key())
    assert reply.status_code == 401
    assert delta(before, counters(stack.policyd_socket))["auth_refusals_held"] == 1
    assert _from("127.0.0.23", gateway, None).status_code == 401
    assert _from("127.0.0.22", gateway, api_key).status_code == 200
    assert delta(before, counters(stack.policyd_socket))["auth_refusals_held"] == 1


def test_a_client_cannot_name_another_client_to_escape_its_budget(
    stack: Stack, gateway: str
) -> None:
    """X-Forwarded-For and a client-sent X-Nz-Client change nothing: Caddy names the
    client by its connection, so rotating them keeps every failure on one count."""
    before = counters(stack.policyd_socket)
    for index in range(CLIENT_BUDGET + 1):
        spoofed = {"X-Forwarded-For": f"10.0.0.{index}", "X-Nz-Client": f"10.1.0.{index}"}
        assert _from("127.0.0.25", gateway, None, spoofed).status_code == 401
    assert delta(before, counters(stack.policyd_socket))["auth_refusals_held"] == 1

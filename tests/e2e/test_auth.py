"""Authentication through the gateway: every bad key is a 401 in the caller's format."""

from __future__ import annotations

import datetime as dt
import time

import httpx
import pytest

from compose.local.cli_runner import run_cli, run_cli_json
from compose.local.parts import Stack
from tests.e2e.conftest import StandinLog

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def call(gateway: str, path: str, auth: str | None) -> httpx.Response:
    headers = {} if auth is None else {"Authorization": auth}
    return httpx.post(f"{gateway}{path}", json=CHAT, headers=headers, timeout=10)


def assert_refused(reply: httpx.Response, path: str, code: str) -> None:
    assert reply.status_code == 401, reply.text
    assert reply.headers["x-nz-refusal"] == code
    assert reply.headers["www-authenticate"].startswith("Bearer")
    if path.startswith("/v1/"):
        error = reply.json()["error"]
        assert error["code"] == code
        assert error["type"] == "authentication_error"
        assert error["message"]
    else:
        assert isinstance(reply.json()["error"], str)


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
@pytest.mark.parametrize(
    ("auth", "code"),
    [
        (None, "missing_api_key"),
        ("Basic dXNlcjpwYXNz", "missing_api_key"),
        ("Bearer", "missing_api_key"),
        ("Bearer sk-not-ours", "malformed_api_key"),
        ("Bearer nz_abcdefgh_tooshort", "malformed_api_key"),
        ("Bearer nz_abcdefgh_" + "A" * 43, "invalid_api_key"),
    ],
)
def test_missing_and_malformed_keys_are_refused(
    gateway: str, standin_log: StandinLog, path: str, auth: str | None, code: str
) -> None:
    """No key, another scheme, a foreign key or an unknown prefix: 401, nothing upstream."""
    assert_refused(call(gateway, path, auth), path, code)
    assert standin_log.requests() == []


def test_wrong_secret_for_a_real_prefix_is_refused(
    gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """The right prefix with another secret fails, before and after the key was cached."""
    wrong = api_key[:-4] + ("AAAA" if not api_key.endswith("AAAA") else "BBBB")
    assert_refused(call(gateway, "/api/chat", f"Bearer {wrong}"), "/api/chat", "invalid_api_key")
    assert call(gateway, "/api/chat", f"Bearer {api_key}").status_code == 200
    assert_refused(call(gateway, "/api/chat", f"Bearer {wrong}"), "/api/chat", "invalid_api_key")
    assert len(standin_log.requests()) == 1


def test_revoked_key_is_refused_within_a_second(stack: Stack, gateway: str, api_key: str) -> None:
    """After revoke-key, the cached key stops working within one second."""
    assert call(gateway, "/api/chat", f"Bearer {api_key}").status_code == 200
    run_cli("revoke-key", "--prefix", api_key[:11], env=stack.env)
    revoked_at = time.monotonic()
    while True:
        reply = call(gateway, "/v1/chat/completions", f"Bearer {api_key}")
        if reply.status_code == 401:
            break
        assert time.monotonic() - revoked_at < 1.0, "revocation took longer than a second"
        time.sleep(0.05)
    assert_refused(reply, "/v1/chat/completions", "revoked_api_key")
    listed = run_cli_json("list-keys", env=stack.env)
    assert listed[0]["status"] == "revoked"


def test_expired_key_is_refused(stack: Stack, gateway: str, tenant: str) -> None:
    """A key past its expiry gets 401 even though it was valid and cached before."""
    # Long enough that a loaded machine still makes the first call before the expiry.
    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=8)).isoformat()
    key = run_cli_json(
        "create-key", "--tenant", tenant, "--name", "short", "--expires", expires, env=stack.env
    )["key"]
    assert call(gateway, "/api/chat", f"Bearer {key}").status_code == 200
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        reply = call(gateway, "/api/chat", f"Bearer {key}")
        if reply.status_code == 401:
            assert_refused(reply, "/api/chat", "expired_api_key")
            return
        time.sleep(0.2)
    pytest.fail("expired key was still accepted")


def test_last_used_is_recorded(stack: Stack, gateway: str, api_key: str) -> None:
    """list-keys shows when a key was last used (batched, within seconds)."""
    assert call(gateway, "/api/chat", f"Bearer {api_key}").status_code == 200
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        listed = run_cli_json("list-keys", env=stack.env)
        if listed[0]["last_used_at"]:
            return
        time.sleep(1)
    pytest.fail("last_used_at never set")

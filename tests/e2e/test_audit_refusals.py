"""Refusals in the audit: a verified key is named, an unverified one only by its claim."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from compose.local.parts import Stack
from tests.e2e.conftest import make_key
from tests.e2e.test_admission import set_limits
from tests.e2e.test_metering import _rows, audit_rows

_CHAT: dict[str, Any] = {
    "model": "llama3.2",
    "stream": False,
    "messages": [{"role": "user", "content": "hi"}],
}


def _ids(stack: Stack, key: str) -> tuple[str, str]:
    """(tenant id, key id) of a key."""
    sql = "SELECT id::text AS id, tenant_id::text AS tenant FROM api_keys WHERE prefix = :p"
    rows = asyncio.run(_rows(stack, sql, p=key[:11]))
    return str(rows[0]["tenant"]), str(rows[0]["id"])


def test_refusals_of_a_verified_key_name_tenant_key_and_model(stack: Stack, gateway: str) -> None:
    """429, 403 and 400 after the key verified: the audit row names tenant, key and model;
    the client's answer does not carry the audit header."""
    key = make_key(stack, tenant="probe-corp", name="prober")
    set_limits(stack, key=key[:11], allowed_models=("llama3.2",), max_output_tokens=50, rpm=3)
    tenant_id, key_id = _ids(stack, key)
    auth = {"Authorization": f"Bearer {key}"}
    cases = [
        ("/api/chat", {**_CHAT, "model": "qwen2.5-coder:7b"}, 403, "qwen2.5-coder:7b"),
        ("/api/chat", {**_CHAT, "options": {"num_predict": 5000}}, 400, "llama3.2"),
        (
            "/v1/chat/completions",
            {**_CHAT, "model": "gpt-oss:120b-cloud"},
            403,
            "gpt-oss:120b-cloud",
        ),
        ("/api/chat", {**_CHAT, "MODEL": "x"}, 400, None),
    ]
    sent: list[tuple[str, int, str | None]] = []
    with httpx.Client(base_url=gateway, timeout=30) as client:
        for path, body, status, model in cases:
            reply = client.post(path, json=body, headers=auth)
            assert reply.status_code == status, reply.text
            assert "x-nz-refused" not in reply.headers
            sent.append((reply.headers["x-request-id"], status, model))
        bad = client.post("/api/chat", content=b"{not json", headers=auth)
        assert bad.status_code == 400
        assert "x-nz-refused" not in bad.headers
        sent.append((bad.headers["x-request-id"], 400, None))
        # rpm 3: the first three requests above used it up? Only admitted ones count, so
        # spend it on real requests, then one more is refused with 429.
        statuses = []
        for _ in range(4):
            reply = client.post("/api/chat", json=_CHAT, headers=auth)
            statuses.append(reply.status_code)
            last = reply
        assert statuses[-1] == 429, statuses
        assert "x-nz-refused" not in last.headers
        sent.append((last.headers["x-request-id"], 429, "llama3.2"))
    rows = audit_rows(stack, [request_id for request_id, _, _ in sent])
    for request_id, status, model in sent:
        row = rows[request_id]
        assert row["status"] == status, row
        assert str(row["tenant_id"]) == tenant_id, row
        assert str(row["key_id"]) == key_id, row
        assert row["key_prefix"] == key[:11], row
        assert row["model"] == model, row
        assert row["claimed_prefix"] is None
        assert row["refusal"], row
        # Refused: nothing reserved, nothing charged.
        assert (row["prompt_tokens"], row["completion_tokens"]) == (0, 0)


def test_a_failed_key_is_recorded_by_its_claimed_prefix_only(stack: Stack, gateway: str) -> None:
    """A 401 for a well-formed key records the prefix it claimed, apart from verified ones;
    another tenant's real prefix with a wrong secret is never attributed to that tenant."""
    victim = make_key(stack, tenant="victim-corp", name="real")
    forged = victim[:12] + ("A" if victim[12] != "A" else "B") + victim[13:]
    replies = [
        httpx.post(
            f"{gateway}/api/chat",
            json=_CHAT,
            headers={"Authorization": f"Bearer {forged}"},
            timeout=30,
        ),
        httpx.post(f"{gateway}/api/chat", json=_CHAT, headers={"Authorization": "Bearer junk"}),
        # A bad body with a forged key: the key is checked first, and only claimed.
        httpx.post(
            f"{gateway}/api/chat",
            content=b"[",
            headers={"Authorization": f"Bearer {forged}"},
            timeout=30,
        ),
    ]
    # Over 100 kB: policyd checks the key before Caddy reads the body (/authz/key).
    replies.append(
        httpx.post(
            f"{gateway}/api/chat",
            json={**_CHAT, "padding": "x" * 200_000},
            headers={"Authorization": f"Bearer {forged}"},
            timeout=30,
        )
    )
    assert [r.status_code for r in replies] == [401, 401, 401, 401]
    assert all("x-nz-refused" not in r.headers for r in replies)
    ids = [r.headers["x-request-id"] for r in replies]
    rows = audit_rows(stack, ids)
    claimed = [rows[i]["claimed_prefix"] for i in ids]
    assert claimed == [victim[:11], None, victim[:11], victim[:11]]
    for request_id in ids:
        row = rows[request_id]
        assert row["key_prefix"] is None
        assert row["key_id"] is None
        assert row["tenant_id"] is None

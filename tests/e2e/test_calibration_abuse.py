"""A tenant cannot move another tenant's streamed charge, nor its own beyond its bound."""

from __future__ import annotations

import json
from typing import Any

import httpx

from compose.local.parts import Stack
from meterd.calibration import OWN_RANGE
from tests.e2e.conftest import make_key
from tests.e2e.test_metering import audit_rows

_R = [
    {"role": "system", "content": "Answer in plain prose."},
    {"role": "user", "content": "Tell me about the rivers of Europe and their deltas."},
]
_SPELLED = "registry.ollama.ai/library/llama3.2:latest"


def _stream(gateway: str, key: str, body: dict[str, Any], path: str = "/api/chat") -> str:
    with httpx.stream(
        "POST",
        f"{gateway}{path}",
        json={**body, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    ) as reply:
        assert reply.status_code == 200
        reply.read()
        return reply.headers["x-request-id"]


def _post(gateway: str, key: str, raw: bytes, path: str = "/api/chat") -> httpx.Response:
    reply = httpx.post(
        f"{gateway}{path}",
        content=raw,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text[:200]
    return reply


def _charges(stack: Stack, ids: list[str]) -> list[tuple[int, int]]:
    rows = audit_rows(stack, ids)
    assert all(rows[i]["usage_source"] == "estimated" for i in ids)
    return [(rows[i]["prompt_tokens"], rows[i]["completion_tokens"]) for i in ids]


def _honest(n: int) -> bytes:
    messages = [
        {"role": "user", "content": f"Question {n}: describe a city by a river, its bridges."}
    ]
    return json.dumps({"model": "llama3.2", "messages": messages, "stream": False}).encode()


def test_poisoning_attempts_do_not_move_other_tenants_streamed_charges(
    stack: Stack, gateway: str
) -> None:
    """Padding (60 KB of an unknown field), 2 MB of whitespace, prompts that tokenise
    densely or sparsely, and another spelling of the model: another tenant's streamed
    charge does not move at all, and the attacker's own stays within its bound."""
    victim = make_key(stack, tenant="victim-co", name="v")
    fresh = make_key(stack, tenant="fresh-co", name="f")
    attacker = make_key(stack, tenant="attacker-co", name="a")
    truth = make_key(stack, tenant="truth-co", name="t")
    # The victim's own honest traffic calibrates its own figures.
    for n in range(6):
        _post(gateway, victim, _honest(n))
    request = {"model": "llama3.2", "messages": _R}
    before = _charges(stack, [_stream(gateway, k, request) for k in (victim, fresh)])

    for n in range(6):
        padded = json.loads(_honest(n))
        padded["padding"] = "x" * 60_000
        padded["model"] = _SPELLED
        _post(gateway, attacker, json.dumps(padded).encode())
        spaced = json.dumps(json.loads(_honest(n + 10)), indent=2).encode()
        _post(gateway, attacker, spaced.replace(b"\n", b"\n" + b" " * 2_000_000, 1))
        # Dense (one token per character) and sparse (four letters a token) prompts.
        dense = {"role": "user", "content": "!?" * 400}
        sparse = {"role": "user", "content": "abcd" * 400}
        for message in (dense, sparse):
            body = {"model": _SPELLED, "messages": [message], "stream": False}
            _post(gateway, attacker, json.dumps(body).encode())
    after = _charges(stack, [_stream(gateway, k, request) for k in (victim, fresh)])
    assert after == before

    # The attacker's own streamed charge for an honest request: within its bound of the
    # truth (the same request, not streamed, by a tenant that learnt nothing from it).
    exact = _post(gateway, truth, json.dumps({**request, "stream": False}).encode()).json()
    own = _charges(stack, [_stream(gateway, attacker, {**request, "model": _SPELLED})])[0]
    assert own[0] >= exact["prompt_eval_count"] / OWN_RANGE["prompt"] / 1.25 - 1
    assert abs(own[1] - exact["eval_count"]) <= max(3, exact["eval_count"] // 20)

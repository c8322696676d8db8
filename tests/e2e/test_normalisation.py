"""Tenant isolation on a shared Ollama, through the real Caddy: the body Ollama receives
is policyd's, with the key's output cap and the operator's runtime policy written in."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Final

import httpx
import ollama
import openai
import pytest

from compose.local.cli_runner import run_cli
from compose.local.parts import Stack
from policyd.shared.contract import LOG_GRANT, parse_grant
from tests.e2e.conftest import StandinLog, make_key
from tests.e2e.test_admission import set_limits
from tests.e2e.test_bodies import assert_refusal, post
from tests.e2e.test_hygiene import log_line

__all__: list[str] = []

MESSAGES: Final = [{"role": "user", "content": "tell me a long story about the sea"}]
#: The same for the OpenAI SDK, whose message types are TypedDicts.
OAI_MESSAGES: Final[list[Any]] = list(MESSAGES)
#: Ollama's runner options that would reload a model every tenant shares.
RUNNER: Final = {
    "num_gpu": 99,
    "main_gpu": 1,
    "num_batch": 7,
    "num_thread": 3,
    "use_mmap": False,
    "use_mlock": True,
    "numa": True,
}


def _upstream_bodies(log: StandinLog) -> list[dict[str, Any]]:
    return [
        json.loads(r["body"]) for r in log.requests() if r["path"].startswith(("/api/", "/v1/"))
    ]


def _runners(stack: Stack) -> dict[str, Any]:
    found: dict[str, Any] = httpx.get(f"{stack.standin_url}/__standin/runners", timeout=5).json()
    return found


@pytest.fixture
def capped_key(stack: Stack) -> str:
    """A key of its own tenant whose output cap (5 tokens) was set with the CLI."""
    key = make_key(stack, tenant="capped", name="cap5")
    run_cli("set-limits", "--key", key[:11], "--max-output-tokens", "5", env=stack.env)
    return key


@pytest.fixture
def native(gateway: str, capped_key: str) -> Iterator[ollama.Client]:
    client = ollama.Client(host=gateway, headers={"Authorization": f"Bearer {capped_key}"})
    yield client
    client.close()  # type: ignore[no-untyped-call]  # untyped in ollama 0.6


@pytest.fixture
def oai(gateway: str, capped_key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gateway}/v1", api_key=capped_key, max_retries=0) as client:
        yield client


@pytest.mark.parametrize("num_predict", [None, -1, -2, 0])
def test_native_output_cap_is_written_into_the_body(
    native: ollama.Client, standin_log: StandinLog, num_predict: int | None
) -> None:
    """Absent, -1, -2 or 0 num_predict: Ollama gets the key's cap and never sends more."""
    options = None if num_predict is None else {"num_predict": num_predict}
    whole = native.chat(model="llama3.2", messages=MESSAGES, options=options, stream=False)
    assert whole.eval_count is not None
    assert whole.eval_count <= 5
    chunks = list(native.chat(model="llama3.2", messages=MESSAGES, options=options, stream=True))
    assert chunks[-1].eval_count is not None
    assert chunks[-1].eval_count <= 5
    made = native.generate(model="llama3.2", prompt="tell me a story", options=options)
    assert made.eval_count is not None
    assert made.eval_count <= 5
    bodies = _upstream_bodies(standin_log)
    assert len(bodies) == 3
    assert all(b["options"]["num_predict"] == 5 for b in bodies), bodies


def test_openai_output_cap_is_written_into_the_body(
    oai: openai.OpenAI, standin_log: StandinLog
) -> None:
    """No max_tokens, or only max_completion_tokens (which Ollama ignores): capped anyway."""
    plain = oai.chat.completions.create(model="llama3.2", messages=OAI_MESSAGES)
    assert plain.usage is not None
    assert plain.usage.completion_tokens <= 5
    newer = oai.chat.completions.create(
        model="llama3.2",
        messages=OAI_MESSAGES,
        max_completion_tokens=3,
    )
    assert newer.usage is not None
    assert newer.usage.completion_tokens <= 3
    stream = oai.chat.completions.create(
        model="llama3.2",
        messages=OAI_MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage for c in stream if c.usage is not None]
    assert usage
    assert usage[-1].completion_tokens <= 5
    done = oai.completions.create(model="llama3.2", prompt="tell me a story")
    assert done.usage is not None
    assert done.usage.completion_tokens <= 5
    bodies = _upstream_bodies(standin_log)
    assert [b["max_tokens"] for b in bodies] == [5, 3, 5, 5]
    assert all("max_completion_tokens" not in b for b in bodies)


def test_explicit_requests_above_the_cap_are_refused(
    gateway: str, capped_key: str, api_key: str, standin_log: StandinLog
) -> None:
    """Above the key's cap: 400 naming both numbers; a huge number is 400 too, never 503."""
    native = {"model": "llama3.2", "messages": MESSAGES, "options": {"num_predict": 6}}
    reply = post(gateway, "/api/chat", json.dumps(native).encode(), key=capped_key)
    assert "5" in assert_refusal(reply, "/api/chat", 400, "max_output_tokens_exceeded")
    body = {"model": "llama3.2", "messages": MESSAGES, "max_tokens": 6}
    reply = post(gateway, "/v1/chat/completions", json.dumps(body).encode(), key=capped_key)
    assert_refusal(reply, "/v1/chat/completions", 400, "max_output_tokens_exceeded")
    # A key without a cap: 1e18 used to reach the admission script and fail as a 503.
    for path, huge in (
        (
            "/api/chat",
            b'{"model":"llama3.2","messages":[{"role":"user","content":"x"}],'
            b'"options":{"num_predict":1e18}}',
        ),
        (
            "/api/generate",
            b'{"model":"llama3.2","prompt":"x","options":{"num_predict":' + b"9" * 5000 + b"}}",
        ),
        (
            "/v1/chat/completions",
            b'{"model":"llama3.2","messages":[{"role":"user","content":"x"}],'
            b'"max_tokens":1000000000000}',
        ),
        (
            "/api/chat",
            b'{"model":"llama3.2","messages":[{"role":"user","content":"x"}],'
            b'"options":{"temperature":1e999}}',
        ),
        ("/api/generate", b'{"model":"llama3.2","prompt":"x","context":[1,1e18]}'),
    ):
        reply = post(gateway, path, huge, key=api_key)
        assert reply.status_code == 400, (path, reply.status_code, reply.text)
    assert standin_log.requests() == []


def test_runtime_options_belong_to_the_operator(
    stack: Stack, gateway: str, standin_log: StandinLog
) -> None:
    """keep_alive, num_ctx and load-affecting options never reach Ollama from a default key,
    so no tenant reloads, pins or unloads a shared model; a key's limits clamp them."""
    key = make_key(stack, tenant="runtime", name="plain")
    before = _runners(stack).get("qwen2.5-coder:7b", {}).get("loads", 0)
    sent = []
    for keep_alive, extra in ((-1, RUNNER), ("9999h", {"num_ctx": 999_999}), (0, {"num_ctx": 2})):
        body = {
            "model": "qwen2.5-coder:7b",
            "prompt": "hi",
            "stream": False,
            "keep_alive": keep_alive,
            "options": {"temperature": 0.5, **extra},
        }
        reply = post(gateway, "/api/generate", json.dumps(body).encode(), key=key)
        assert reply.status_code == 200, reply.text
        sent.append(body)
    bodies = _upstream_bodies(standin_log)
    for body in bodies:
        assert "keep_alive" not in body
        assert body["options"] == {"temperature": 0.5, "num_predict": 1024}
    runner = _runners(stack)["qwen2.5-coder:7b"]
    assert runner["loads"] - before <= 1
    assert runner["loaded"]
    # The same key with limits set: keep_alive clamped into (0, 60], num_ctx to 8192.
    set_limits(stack, key=key[:11], max_keep_alive_seconds=60, max_num_ctx=8192)
    standin_log.clear()
    for keep_alive, num_ctx in ((-1, 999_999), ("30s", 2048), (0, 4096), ("1.5s", 0)):
        body = {
            "model": "qwen2.5-coder:7b",
            "prompt": "hi",
            "stream": False,
            "keep_alive": keep_alive,
            "options": {"num_ctx": num_ctx},
        }
        assert post(gateway, "/api/generate", json.dumps(body).encode(), key=key).status_code == 200
    got = [
        (b.get("keep_alive"), b["options"].get("num_ctx")) for b in _upstream_bodies(standin_log)
    ]
    assert got == [(60, 8192), (30, 2048), (None, 4096), (2, None)]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/generate", {"model": "llama3.2", "keep_alive": 0}),
        ("/api/generate", {"model": "llama3.2", "prompt": "", "keep_alive": -1}),
        ("/api/chat", {"model": "llama3.2", "messages": [], "keep_alive": 0}),
        ("/api/embed", {"model": "all-minilm", "input": [], "keep_alive": 0}),
        ("/v1/chat/completions", {"model": "llama3.2", "messages": []}),
        ("/v1/completions", {"model": "llama3.2", "prompt": ""}),
    ],
)
def test_load_and_unload_only_requests_are_refused(
    gateway: str, api_key: str, standin_log: StandinLog, path: str, body: dict[str, Any]
) -> None:
    """A body with no prompt only loads or unloads a shared model: 400, Ollama never asked."""
    reply = post(gateway, path, json.dumps(body).encode(), key=api_key)
    assert "load or unload" in assert_refusal(reply, path, 400, "invalid_request_body")
    assert standin_log.requests() == []


def test_ollama_client_cannot_unload_a_model_another_tenant_uses(
    stack: Stack, gateway: str
) -> None:
    """The official client's unload (`generate(model, keep_alive=0)`) is refused, a chat
    with `keep_alive: 0` is served without it: the model another tenant uses stays loaded."""
    other = make_key(stack, tenant="neighbour", name="user")
    post(
        gateway,
        "/api/chat",
        json.dumps({"model": "llama3.2", "messages": MESSAGES, "stream": False}).encode(),
        key=other,
    ).raise_for_status()
    attacker = make_key(stack, tenant="attacker", name="unload")
    with ollama.Client(host=gateway, headers={"Authorization": f"Bearer {attacker}"}) as client:
        with pytest.raises(ollama.ResponseError) as caught:
            client.generate(model="llama3.2", keep_alive=0)
        assert caught.value.status_code == 400
        # With a prompt it is inference: its keep_alive 0 and num_ctx are dropped.
        client.chat(
            model="llama3.2", messages=MESSAGES, keep_alive=0, stream=False, options={"num_ctx": 1}
        )
    assert _runners(stack)["llama3.2:latest"]["loaded"]


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("/api/generate", {"prompt": "x", "context": [1] * 200_000}),
        ("/api/generate", {"prompt": "x", "images": ["aGVsbG8="] * 3}),
        ("/api/chat", {"messages": [{"role": "user", "content": "x", "images": ["aGk="] * 2}]}),
        (
            "/api/chat",
            {
                "messages": MESSAGES,
                "tools": [
                    {"type": "function", "function": {"name": "f", "description": "d" * 540_000}}
                ],
            },
        ),
        ("/api/generate", {"prompt": "x", "template": "t" * 9_000}),
        ("/api/generate", {"prompt": "x", "system": "s" * 9_000}),
        ("/api/generate", {"prompt": "x", "suffix": "s" * 9_000}),
        (
            "/api/generate",
            {"prompt": "x", "format": {"type": "object", "description": "f" * 9_000}},
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64,aGk="},
                            }
                        ]
                        * 2,
                    }
                ]
            },
        ),
    ],
)
def test_reservation_counts_everything_ollama_tokenises(
    stack: Stack, gateway: str, standin_log: StandinLog, path: str, extra: dict[str, Any]
) -> None:
    """Context ids, images, tools, template, system, suffix and format all count: on a
    2,000-token daily budget each of these bodies exceeds what one request may reserve."""
    key = make_key(stack, tenant="budget2k", name="k")
    set_limits(stack, key=key[:11], daily_tokens=2000, max_output_tokens=10)
    body = {"model": "llama3.2", "stream": False, **extra}
    reply = post(gateway, path, json.dumps(body).encode(), key=key)
    assert_refusal(reply, path, 400, "reservation_exceeds_limit")
    assert standin_log.requests() == []


def test_prompt_tokens_of_images_and_tools_reach_the_grant_and_ollama_counts_them(
    gateway: str, api_key: str, stack: Stack
) -> None:
    """The grant's prompt= counts the images; the stand-in's prompt_eval_count does too."""
    body = {"model": "llama3.2", "prompt": "x", "images": ["aGk="] * 2, "stream": False}
    reply = post(gateway, "/api/generate", json.dumps(body).encode(), key=api_key)
    assert reply.status_code == 200, reply.text
    assert reply.json()["prompt_eval_count"] > 2 * 500
    # Wait for this request's line: Caddy writes it after the reply.
    grant = parse_grant(log_line(stack, reply.headers["x-request-id"])[LOG_GRANT])
    assert int(grant["prompt"]) >= 2 * 1024


def test_non_ascii_and_the_body_header_stay_where_they_belong(
    gateway: str, api_key: str, standin_log: StandinLog, stack: Stack
) -> None:
    """Non-ASCII text arrives intact (ASCII-escaped); the body header reaches neither
    Ollama nor the access log."""
    text = 'héllo wörld ✓ 😀 \u2028 <tag> "q"'
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": text}], "stream": False}
    reply = post(gateway, "/api/chat", json.dumps(body, ensure_ascii=False).encode(), key=api_key)
    assert reply.status_code == 200, reply.text
    (seen,) = standin_log.requests()
    assert seen["body"].isascii()
    assert json.loads(seen["body"])["messages"][0]["content"] == text
    assert int(seen["headers"]["content-length"]) == len(seen["body"])
    assert not any(name.startswith("x-nz-upstream") for name in seen["headers"])
    assert "X-Nz-Upstream-Body" not in stack.access_log.read_text(encoding="utf-8")
    assert "h\\u00e9llo" not in stack.access_log.read_text(encoding="utf-8").split("req_body")[0]


def test_listings_show_only_the_keys_models(stack: Stack, gateway: str) -> None:
    """/api/tags, /api/ps and /v1/models list only allowed models (official clients);
    a key without an allowlist sees Ollama's own listing."""
    free = make_key(stack, tenant="lister", name="free")
    post(
        gateway,
        "/api/generate",
        json.dumps({"model": "qwen2.5-coder:7b", "prompt": "x", "stream": False}).encode(),
        key=free,
    ).raise_for_status()
    post(
        gateway,
        "/api/generate",
        json.dumps({"model": "llama3.2", "prompt": "x", "stream": False}).encode(),
        key=free,
    ).raise_for_status()
    key = make_key(stack, tenant="lister", name="scoped")
    run_cli("set-limits", "--key", key[:11], "--models", "llama3.2", env=stack.env)
    with ollama.Client(host=gateway, headers={"Authorization": f"Bearer {key}"}) as client:
        assert [m.model for m in client.list().models] == ["llama3.2:latest"]
        assert [m.model for m in client.ps().models] == ["llama3.2:latest"]
    with openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0) as oai:
        assert [m.id for m in oai.models.list()] == ["llama3.2:latest"]
    with ollama.Client(host=gateway, headers={"Authorization": f"Bearer {free}"}) as client:
        assert len(client.list().models) >= 3
    headers = {"Authorization": f"Bearer {key}"}
    reply = httpx.get(f"{gateway}/api/tags", headers=headers, timeout=10)
    assert reply.headers["content-type"].startswith("application/json")
    assert "x-nz-listing" not in reply.headers

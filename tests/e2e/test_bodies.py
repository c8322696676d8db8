"""Request bodies through Caddy: what Ollama might read differently, or must not get, is refused."""

from __future__ import annotations

import json
import time
from typing import Any, Final

import httpx

from compose.local.cli_runner import run_cli
from compose.local.parts import Stack
from compose.local.services import DEFAULT_MAX_BODY_BYTES
from tests.e2e.conftest import StandinLog

__all__: list[str] = []

SURFACES: Final = ("/api/chat", "/v1/chat/completions")
_MESSAGES: Final = '[{"role":"user","content":"hi"}]'

#: Bodies Go's decoder would read differently from a plain JSON parser.
AMBIGUOUS: Final = (
    # Go matches keys case-insensitively: which model would Ollama run?
    b'{"model":"llama3.2","MODEL":"other","messages":' + _MESSAGES.encode() + b"}",
    b'{"Model":"llama3.2","messages":' + _MESSAGES.encode() + b"}",
    # Go takes the last duplicate; Python's json takes the last too, but a proxy might not.
    b'{"model":"llama3.2","model":"other","messages":' + _MESSAGES.encode() + b"}",
    b'{"model":"llama3.2","messages":' + _MESSAGES.encode() + b',"stream":false,"stream":true}',
    # U+017F (long s) folds to "s" in Go: this is `stream` to Ollama.
    b'{"model":"llama3.2","messages":' + _MESSAGES.encode() + b',"\\u017ftream":true}',
    '{"model":"llama3.2","messages":[],"\u017ftream":true}'.encode(),
    b'{"model":"llama3.2","messages":' + _MESSAGES.encode() + b',"stream":false,"STREAM":true}',
)
NOT_JSON: Final = (
    b"model=llama3.2",
    b'{"model":"llama3.2",',
    b'["model","llama3.2"]',
    b'"llama3.2"',
    b"\xff\xfe{}",
    b'{"model":"llama3.2","messages":[],"temperature":NaN}',
)
CLOUD_MODELS: Final = (
    "gpt-oss:120b-cloud",
    "deepseek-v3.1:671b-cloud",
    "llama3.2:cloud",
    "x-cloud",
)
#: Names that would smuggle a line break into headers and log fields.
BAD_MODEL_NAMES: Final = ("llama3.2\r\nX-Nz-Key-Id: evil", "llama3.2\n", "llama\r3.2", "llama 3.2")


def post(gateway: str, path: str, body: bytes, *, key: str, timeout: float = 15) -> httpx.Response:
    """POST raw bytes as JSON with the key."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(f"{gateway}{path}", content=body, headers=headers, timeout=timeout)


def chat_body(**fields: Any) -> bytes:
    """A small non-streamed chat body with `fields` on top."""
    body: dict[str, Any] = {"model": "llama3.2", "messages": json.loads(_MESSAGES)}
    body["stream"] = False
    body.update(fields)
    return json.dumps(body).encode()


def assert_refusal(reply: httpx.Response, path: str, status: int, code: str) -> str:
    """The reply is `status` in the format of `path`'s surface; returns the message."""
    assert reply.status_code == status, (path, reply.status_code, reply.text)
    assert reply.headers["x-nz-refusal"] == code, (path, reply.headers)
    assert reply.headers["content-type"].startswith("application/json")
    error = reply.json()["error"]
    if path.startswith("/v1/"):
        assert set(error) >= {"message", "type", "code"}, error
        assert error["code"] == code
        assert isinstance(error["message"], str)
        assert error["message"]
        message: str = error["message"]
    else:
        assert isinstance(error, str), error
        assert error
        message = error
    return message


def test_ambiguous_bodies_are_refused_in_the_surface_format(
    gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """Case variants, duplicate keys and the long-s `stream` are 400 and never reach Ollama."""
    for path in SURFACES:
        for body in AMBIGUOUS:
            reply = post(gateway, path, body, key=api_key)
            message = assert_refusal(reply, path, 400, "invalid_request_body")
            assert "key" in message, (body, message)
    assert standin_log.requests() == []


def test_bodies_that_are_not_json_objects_are_refused(
    gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """Form data, truncated JSON, arrays, strings, bad UTF-8 and NaN are 400 in both formats."""
    for path in SURFACES:
        for body in NOT_JSON:
            assert_refusal(
                post(gateway, path, body, key=api_key), path, 400, "invalid_request_body"
            )
        # An empty body names no model at all.
        assert_refusal(post(gateway, path, b"", key=api_key), path, 400, "invalid_request_body")
    assert standin_log.requests() == []


def test_cloud_models_are_forbidden(gateway: str, api_key: str, standin_log: StandinLog) -> None:
    """`:cloud` and `-cloud` models (any case) are 403 on both surfaces and never reach Ollama."""
    for path in SURFACES:
        for model in (*CLOUD_MODELS, "GPT-OSS:120B-CLOUD", " llama3.2:cloud "):
            reply = post(gateway, path, chat_body(model=model), key=api_key)
            message = assert_refusal(reply, path, 403, "cloud_model_forbidden")
            assert "cloud" in message
    assert standin_log.requests() == []


def test_oversized_body_is_413_in_the_surface_format(
    gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """A body over NZ_MAX_BODY_BYTES (default 8 MiB) is a clear 413 and never reaches Ollama."""
    padding = "x" * (DEFAULT_MAX_BODY_BYTES + 1024 * 1024)
    body = chat_body(messages=[{"role": "user", "content": padding}])
    assert len(body) > DEFAULT_MAX_BODY_BYTES
    for path in SURFACES:
        reply = post(gateway, path, body, key=api_key, timeout=60)
        message = assert_refusal(reply, path, 413, "request_too_large")
        assert str(DEFAULT_MAX_BODY_BYTES) in message
    assert standin_log.requests() == []
    # Just under the limit is fine: the bound is the limit, not something smaller.
    near = "x" * (DEFAULT_MAX_BODY_BYTES - 64 * 1024)
    fits = chat_body(messages=[{"role": "user", "content": near}], max_tokens=1)
    assert len(fits) <= DEFAULT_MAX_BODY_BYTES
    reply = post(gateway, SURFACES[1], fits, key=api_key, timeout=60)
    assert reply.status_code == 200, reply.text


def test_model_names_with_line_breaks_are_refused(
    gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """A model name with CR, LF or a space (it travels in headers and the log) is 400."""
    outcomes = {
        (path, model): post(gateway, path, chat_body(model=model), key=api_key)
        for path in SURFACES
        for model in BAD_MODEL_NAMES
    }
    wrong = {case: (r.status_code, r.text) for case, r in outcomes.items() if r.status_code != 400}
    assert wrong == {}
    for (path, _model), reply in outcomes.items():
        assert "model" in assert_refusal(reply, path, 400, "invalid_request_body")
    assert standin_log.requests() == []


def wait_until_refused(gateway: str, path: str, body: bytes, *, key: str) -> httpx.Response:
    """The first refusal of `body` within two seconds (policyd caches a key for under one)."""
    deadline = time.monotonic() + 2.0
    while True:
        reply = post(gateway, path, body, key=key)
        if reply.status_code != 200:
            return reply
        assert time.monotonic() < deadline, f"{path} still allowed {body!r}"
        time.sleep(0.1)


def test_model_allowlist_refuses_other_models(
    stack: Stack, gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """With `set-limits --models llama3.2`, another model is 403 and llama3.2 (any tag) passes."""
    run_cli("set-limits", "--key", api_key[:11], "--models", "llama3.2", env=stack.env)
    for path in SURFACES:
        reply = wait_until_refused(gateway, path, chat_body(model="mistral"), key=api_key)
        message = assert_refusal(reply, path, 403, "model_not_allowed")
        assert "mistral" in message
        for model in ("qwen2.5:0.5b", "llama3.1", "llama3.2-vision"):
            refused = post(gateway, path, chat_body(model=model), key=api_key)
            assert_refusal(refused, path, 403, "model_not_allowed")
    assert standin_log.requests() == []
    for path in SURFACES:
        for model in ("llama3.2", "llama3.2:latest"):
            allowed = post(gateway, path, chat_body(model=model, max_tokens=3), key=api_key)
            assert allowed.status_code == 200, (path, model, allowed.text)
    assert len(standin_log.requests()) == 4


def test_max_output_tokens_refuses_larger_requests(
    stack: Stack, gateway: str, api_key: str, standin_log: StandinLog
) -> None:
    """With `--max-output-tokens 50`, asking for 100 is 400 naming both numbers; 20 passes."""
    run_cli("set-limits", "--key", api_key[:11], "--max-output-tokens", "50", env=stack.env)
    too_many = {
        "/api/chat": chat_body(options={"num_predict": 100}),
        "/v1/chat/completions": chat_body(max_tokens=100),
    }
    for path, body in too_many.items():
        reply = wait_until_refused(gateway, path, body, key=api_key)
        message = assert_refusal(reply, path, 400, "max_output_tokens_exceeded")
        assert "100" in message, message
        assert "50" in message, message
    # The newer OpenAI name for the cap counts too.
    reply = post(gateway, "/v1/chat/completions", chat_body(max_completion_tokens=100), key=api_key)
    assert_refusal(reply, "/v1/chat/completions", 400, "max_output_tokens_exceeded")
    assert standin_log.requests() == []
    within = {
        "/api/chat": chat_body(options={"num_predict": 20}),
        "/v1/chat/completions": chat_body(max_tokens=20),
    }
    for path, body in within.items():
        reply = post(gateway, path, body, key=api_key)
        assert reply.status_code == 200, (path, reply.text)
    assert len(standin_log.requests()) == 2

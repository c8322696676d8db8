"""The native Ollama API, checked with the official `ollama` client and raw HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import ollama
import pytest

from compose.standin.tokenizer import count_tokens, render_generate
from tests.standin.conftest import Standin
from tests.standin.expect import (
    chat_prompt_tokens,
    chat_reply,
    generate_reply,
    prompt_with,
)

JSON_UTF8 = "application/json; charset=utf-8"
METRICS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


@pytest.fixture
def client(fresh: Standin) -> Iterator[ollama.Client]:
    """The official Ollama client pointed at the stand-in."""
    with ollama.Client(host=fresh.url) as client:
        yield client


def test_streamed_chat_counts_equal_streamed_tokens(client: ollama.Client) -> None:
    """Each chunk carries one token; eval_count is their number, cut by num_predict."""
    turns = [("system", "be brief"), ("user", "What is a gateway?")]
    messages = [{"role": role, "content": content} for role, content in turns]
    chunks = list(
        client.chat(model="llama3.2", messages=messages, stream=True, options={"num_predict": 12})
    )
    content = [chunk for chunk in chunks if not chunk.done]
    final = chunks[-1]
    assert final.done
    assert len(content) == 12
    assert final.eval_count == 12
    assert final.done_reason == "length"
    assert final.prompt_eval_count == chat_prompt_tokens(turns)
    assert [chunk.message.content for chunk in content] == chat_reply("llama3.2:latest", turns, 12)
    assert final.message.content == ""


def test_generate_not_streamed_returns_the_whole_reply(client: ollama.Client) -> None:
    """stream:false gives one object with the full text and done_reason stop."""
    reply = client.generate(model="LLAMA3.2", prompt="Tell me about rivers.", stream=False)
    expected = generate_reply("llama3.2:latest", "Tell me about rivers.")
    assert reply.response == "".join(expected)
    assert reply.done_reason == "stop"
    assert reply.eval_count == len(expected)
    assert reply.prompt_eval_count == count_tokens(render_generate("Tell me about rivers."))
    assert reply.model == "LLAMA3.2"  # echoed as the client spelled it


def test_native_stream_framing(http: httpx.Client) -> None:
    """Streaming is the default: NDJSON lines, then a final line with done_reason and counts."""
    response = http.post("/api/generate", json={"model": "llama3.2", "prompt": "hi"})
    assert response.headers["content-type"] == "application/x-ndjson"
    assert "content-length" not in response.headers
    assert response.content.endswith(b"\n")
    lines = [json.loads(line) for line in response.content.splitlines()]
    assert all(list(line) == ["model", "created_at", "response", "done"] for line in lines[:-1])
    final = lines[-1]
    assert final["done"] is True
    assert final["response"] == ""
    assert list(final)[:6] == ["model", "created_at", "response", "done", "done_reason", "context"]
    assert tuple(list(final)[6:]) == METRICS
    assert final["eval_count"] == len(lines) - 1
    assert all(isinstance(final[name], int) and final[name] > 0 for name in METRICS)


def test_stream_false_is_one_json_object(http: httpx.Client) -> None:
    """stream:false answers application/json; charset=utf-8 without a trailing newline."""
    response = http.post(
        "/api/chat",
        json={
            "model": "llama3.2",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": False,
        },
    )
    assert response.headers["content-type"] == JSON_UTF8
    body = response.json()
    assert list(body)[:5] == ["model", "created_at", "message", "done", "done_reason"]
    assert body["message"]["role"] == "assistant"
    assert not response.content.endswith(b"\n")


def test_text_is_html_escaped_like_go(http: httpx.Client) -> None:
    """`<`, `>` and `&` in replies appear as \\u003c, \\u003e, \\u0026 on the wire."""
    prompt = prompt_with("qwen2.5-coder:7b", "<")
    response = http.post(
        "/api/generate", json={"model": "qwen2.5-coder:7b", "prompt": prompt, "stream": False}
    )
    assert b"<" not in response.content
    assert b">" not in response.content
    assert b"\\u003c" in response.content
    assert "<" in response.json()["response"]


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        (
            "/api/generate",
            {"model": "llama3.2", "prompt": ""},
            {"response": "", "done": True, "done_reason": "load"},
        ),
        (
            "/api/generate",
            {"model": "llama3.2", "keep_alive": 0},
            {"response": "", "done": True, "done_reason": "unload"},
        ),
        (
            "/api/chat",
            {"model": "llama3.2", "messages": [], "stream": True},
            {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "load"},
        ),
    ],
)
def test_empty_prompt_loads_the_model(
    http: httpx.Client, path: str, body: dict[str, object], expected: dict[str, object]
) -> None:
    """An empty prompt answers one JSON object (done_reason load/unload), even when streaming."""
    response = http.post(path, json=body)
    assert response.status_code == 200
    assert response.headers["content-type"] == JSON_UTF8
    reply = response.json()
    assert reply.pop("model") == "llama3.2"
    reply.pop("created_at")
    assert reply == expected


def test_embed_and_legacy_embeddings(client: ollama.Client, http: httpx.Client) -> None:
    """/api/embed returns unit vectors and a prompt count; /api/embeddings only a vector."""
    reply = client.embed(model="all-minilm", input=["first text", "second text"])
    assert [len(vector) for vector in reply.embeddings] == [384, 384]
    assert reply.prompt_eval_count == count_tokens("first text") + count_tokens("second text")
    assert abs(sum(v * v for v in reply.embeddings[0]) - 1.0) < 1e-4
    legacy = client.embeddings(model="all-minilm", prompt="first text")
    assert list(legacy.embedding) == pytest.approx(reply.embeddings[0])
    raw = http.post("/api/embed", json={"model": "all-minilm", "input": "x", "stream": True})
    assert raw.headers["content-type"] == JSON_UTF8  # embed never streams
    keys = ["model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"]
    assert list(raw.json()) == keys


def test_list_show_and_ps(client: ollama.Client) -> None:
    """Tags list the default models; show has capabilities; ps lists models used recently."""
    names = [model.model for model in client.list().models]
    assert names == ["llama3.2:latest", "qwen2.5-coder:7b", "all-minilm:latest"]
    shown = client.show("qwen2.5-coder:7b")
    assert shown.capabilities == ["completion", "tools", "insert"]
    assert shown.details is not None
    assert shown.details.family == "qwen2"
    client.generate(model="qwen2.5-coder:7b", prompt="x", options={"num_predict": 1})
    assert "qwen2.5-coder:7b" in [model.model for model in client.ps().models]


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        (
            "/api/chat",
            b'{"model":"all-minilm:latest","messages":[{"role":"user","content":"x"}]}',
            400,
            '"all-minilm:latest" does not support chat',
        ),
        ("/api/generate", b'{"model":"nope","prompt":"x"}', 404, "model 'nope' not found"),
        ("/api/generate", b'{"prompt":"x"}', 404, "model '' not found"),
        ("/api/chat", b'{"messages":[]}', 400, "model is required"),
        ("/api/generate", b"", 400, "missing request body"),
        (
            "/api/generate",
            b'{"model":"llama3.2","stream":"false"}',
            400,
            "json: cannot unmarshal string into Go struct field GenerateRequest.stream"
            " of type bool",
        ),
        ("/api/generate", b'{"model":"llama3.2"', 400, "unexpected EOF"),
        (
            "/api/generate",
            b'{"model":"llama3.2","prompt":"x","suffix":"y"}',
            400,
            '"llama3.2" does not support insert',
        ),
        (
            "/api/embeddings",
            b'{"model":"nope","prompt":"x"}',
            404,
            'model "nope" not found, try pulling it first',
        ),
        ("/api/show", b'{"model":"nope"}', 404, "model 'nope' not found"),
    ],
)
def test_native_errors(
    http: httpx.Client, path: str, body: bytes, status: int, message: str
) -> None:
    """Errors are `{"error": ...}` with Ollama's status and text."""
    response = http.post(path, content=body)
    assert response.status_code == status
    assert response.headers["content-type"] == JSON_UTF8
    assert response.json() == {"error": message}


def test_client_sees_ollama_errors(client: ollama.Client) -> None:
    """The official client raises ResponseError with the status and message."""
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="missing-model", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404
    assert caught.value.error == "model 'missing-model' not found"

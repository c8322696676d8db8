"""The OpenAI-compatible surface, checked with the official `openai` client and raw HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from compose.standin.tokenizer import count_tokens, render_generate
from tests.standin.conftest import Standin
from tests.standin.expect import chat_prompt_tokens, chat_reply, generate_reply

TURNS = [("user", "Explain rate limits.")]
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Explain rate limits."}]


@pytest.fixture
def client(fresh: Standin) -> Iterator[openai.OpenAI]:
    """The official OpenAI client pointed at the stand-in's /v1."""
    with openai.OpenAI(base_url=f"{fresh.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def _events(body: bytes) -> list[bytes]:
    """SSE events, asserting the `data: ...\\n\\n` framing on the way."""
    assert body.endswith(b"\n\n")
    events = body[:-2].split(b"\n\n")
    assert all(event.startswith(b"data: ") and b"\n" not in event for event in events)
    return [event.removeprefix(b"data: ") for event in events]


def test_stream_with_usage_counts_the_streamed_tokens(client: openai.OpenAI) -> None:
    """include_usage adds a final choices:[] chunk whose completion_tokens = content chunks."""
    stream = client.chat.completions.create(
        model="llama3.2",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=15,
    )
    chunks = list(stream)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == len(content) == 15
    assert usage_chunk.usage.prompt_tokens == chat_prompt_tokens(TURNS)
    assert usage_chunk.usage.total_tokens == 15 + chat_prompt_tokens(TURNS)
    assert [c.choices[0].delta.content for c in content] == chat_reply("llama3.2:latest", TURNS, 15)
    assert content[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_usage_has_no_usage_chunk(http: httpx.Client) -> None:
    """Without include_usage: deltas, a finish chunk with an empty delta, then [DONE]."""
    response = http.post(
        "/v1/chat/completions",
        json={"model": "llama3.2", "messages": MESSAGES, "stream": True},
    )
    assert response.headers["content-type"] == "text/event-stream"
    events = _events(response.content)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in chunk["choices"][0]["delta"] for chunk in chunks[1:])
    finish = chunks[-1]["choices"][0]
    assert finish == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert len(chunks) - 1 == len(chat_reply("llama3.2:latest", TURNS))
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["system_fingerprint"] == "fp_ollama"


def test_non_streamed_chat_always_has_usage(client: openai.OpenAI, http: httpx.Client) -> None:
    """stream defaults to false on /v1; the completion carries usage and ends in a newline."""
    completion = client.chat.completions.create(model="llama3.2", messages=MESSAGES)
    expected = chat_reply("llama3.2:latest", TURNS)
    assert completion.choices[0].message.content == "".join(expected)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(expected)
    assert completion.usage.prompt_tokens == chat_prompt_tokens(TURNS)
    raw = http.post("/v1/chat/completions", json={"model": "llama3.2", "messages": MESSAGES})
    assert raw.headers["content-type"] == "application/json"
    assert raw.content.endswith(b"}\n")


def test_completions_stream_zero_usage_then_real_usage(http: httpx.Client) -> None:
    """/v1/completions with include_usage: zero usage on every chunk, the real one last."""
    prompt = "Once upon a time"
    response = http.post(
        "/v1/completions",
        json={
            "model": "llama3.2",
            "prompt": prompt,
            "stream": True,
            "max_tokens": 6,
            "stream_options": {"include_usage": True},
        },
    )
    events = _events(response.content)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert all(chunk["usage"] == zero for chunk in chunks[:-1])
    expected = generate_reply("llama3.2:latest", prompt, 6)
    assert [c["choices"][0]["text"] for c in chunks[:6]] == expected
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    prompt_tokens = count_tokens(render_generate(prompt))
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 6,
        "total_tokens": prompt_tokens + 6,
    }


def test_embeddings_in_both_encodings(client: openai.OpenAI, http: httpx.Client) -> None:
    """The client's default (base64) and plain floats decode to the same unit vectors."""
    result = client.embeddings.create(model="all-minilm", input=["alpha", "beta"])
    assert [len(item.embedding) for item in result.data] == [384, 384]
    assert result.usage.prompt_tokens == count_tokens("alpha") + count_tokens("beta")
    raw = http.post("/v1/embeddings", json={"model": "all-minilm", "input": "alpha"})
    floats = raw.json()["data"][0]["embedding"]
    assert floats == pytest.approx(result.data[0].embedding, abs=1e-6)
    assert raw.json()["usage"] == {"prompt_tokens": 2, "total_tokens": 2}


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    """/v1/models lists the models; retrieving echoes the name; unknown is a 404."""
    ids = [model.id for model in client.models.list()]
    assert ids == ["llama3.2:latest", "qwen2.5-coder:7b", "all-minilm:latest"]
    model = client.models.retrieve("llama3.2")
    assert (model.id, model.owned_by, model.object) == ("llama3.2", "library", "model")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("nope")
    assert caught.value.body == {
        "message": "model 'nope' not found",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }


@pytest.mark.parametrize(
    ("path", "body", "status", "content_type", "message"),
    [
        (
            "/v1/chat/completions",
            {"model": "llama3.2", "messages": []},
            400,
            "application/json; charset=utf-8",
            "[] is too short - 'messages'",
        ),
        (
            "/v1/chat/completions",
            {"model": "nope", "messages": MESSAGES},
            404,
            "application/json",
            "model 'nope' not found",
        ),
        (
            "/v1/chat/completions",
            {"model": "all-minilm", "messages": MESSAGES},
            400,
            "application/json",
            '"all-minilm" does not support chat',
        ),
        (
            "/v1/chat/completions",
            {"model": "llama3.2", "messages": MESSAGES, "stream": "yes"},
            400,
            "application/json; charset=utf-8",
            "json: cannot unmarshal string into Go struct field"
            " ChatCompletionRequest.stream of type bool",
        ),
        ("/v1/embeddings", {"model": "all-minilm"}, 400, "application/json; charset=utf-8",
         "invalid input"),
    ],
)  # fmt: skip
def test_openai_error_shape(
    http: httpx.Client,
    path: str,
    body: dict[str, object],
    status: int,
    content_type: str,
    message: str,
) -> None:
    """Errors keep the status and use OpenAI's error object; the type follows the status."""
    response = http.post(path, json=body)
    assert response.status_code == status
    assert response.headers["content-type"] == content_type
    kind = {400: "invalid_request_error", 404: "not_found_error"}[status]
    assert response.json() == {
        "error": {"message": message, "type": kind, "param": None, "code": None}
    }


def test_client_maps_bad_request(client: openai.OpenAI) -> None:
    """The official client raises BadRequestError for Ollama's 400s."""
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="llama3.2", messages=[])

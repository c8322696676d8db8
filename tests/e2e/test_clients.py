"""The official Ollama and OpenAI clients work through the gateway with a CLI-made key."""

from __future__ import annotations

import time
from collections.abc import Iterator

import ollama
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from compose.local.parts import Stack
from policyd.shared.contract import H_GRANT, parse_grant
from tests.e2e.conftest import StandinLog

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me about rivers."}]


@pytest.fixture
def native(gateway: str, cli_key: str) -> Iterator[ollama.Client]:
    """The official Ollama client, pointed at the gateway with a CLI-made key."""
    client = ollama.Client(host=gateway, headers={"Authorization": f"Bearer {cli_key}"})
    yield client
    client.close()  # type: ignore[no-untyped-call]  # untyped in ollama 0.6


@pytest.fixture
def oai(gateway: str, cli_key: str) -> Iterator[openai.OpenAI]:
    """The official OpenAI SDK, pointed at the gateway's /v1 with a CLI-made key."""
    with openai.OpenAI(base_url=f"{gateway}/v1", api_key=cli_key, max_retries=0) as client:
        yield client


def test_ollama_chat_and_generate_without_streaming(
    native: ollama.Client, oai: openai.OpenAI
) -> None:
    """Non-streamed chat and generate return the whole reply with usage counts."""
    client = native
    chat = client.chat(model="llama3.2", messages=CHAT, stream=False)
    assert chat.message.content
    assert chat.done
    assert chat.eval_count
    assert chat.prompt_eval_count
    generated = client.generate(model="llama3.2", prompt="Why is the sky blue?", stream=False)
    assert generated.response
    assert generated.eval_count


def test_ollama_streams_chunk_by_chunk(slow_stack: Stack, cli_key: str) -> None:
    """Streamed chat arrives one token per chunk, spread over time, not buffered."""
    client = ollama.Client(
        host=slow_stack.gateway_url, headers={"Authorization": f"Bearer {cli_key}"}
    )
    arrivals: list[float] = []
    final = None
    try:
        for part in client.chat(
            model="llama3.2", messages=CHAT, stream=True, options={"num_predict": 20}
        ):
            arrivals.append(time.monotonic())
            final = part
    finally:
        client.close()  # type: ignore[no-untyped-call]  # untyped in ollama 0.6
    assert final is not None
    assert final.done
    assert final.eval_count == len(arrivals) - 1  # every token chunk plus the final one
    # Up to 20 tokens at the slow stand-in's 20 tokens/s take about a second; a
    # buffered reply would deliver them all at once.
    assert arrivals[-1] - arrivals[0] > 0.4


def test_ollama_generate_streams(native: ollama.Client, oai: openai.OpenAI) -> None:
    """Streamed generate yields many chunks ending with done."""
    client = native
    parts = list(client.generate(model="llama3.2", prompt="Count.", stream=True))
    assert len(parts) > 2
    assert parts[-1].done
    assert "".join(p.response or "" for p in parts)


def test_ollama_embed_and_list(native: ollama.Client, oai: openai.OpenAI) -> None:
    """Embeddings and the model list come back through the gateway."""
    client = native
    embedded = client.embed(model="all-minilm", input=["a sentence", "another"])
    assert len(embedded.embeddings) == 2
    assert len(embedded.embeddings[0]) > 10
    names = [m.model for m in client.list().models]
    assert "llama3.2:latest" in names


def test_openai_chat_completion(native: ollama.Client, oai: openai.OpenAI) -> None:
    """Non-streamed chat completions carry the reply and usage."""
    client = oai
    reply = client.chat.completions.create(model="llama3.2", messages=CHAT)
    assert reply.choices[0].message.content
    assert reply.usage is not None
    assert reply.usage.completion_tokens > 0


def test_openai_streams_chunk_by_chunk(slow_stack: Stack, cli_key: str) -> None:
    """SSE chunks arrive one by one; include_usage adds the usage chunk at the end."""
    arrivals: list[float] = []
    usage = None
    text = []
    with openai.OpenAI(
        base_url=f"{slow_stack.gateway_url}/v1", api_key=cli_key, max_retries=0
    ) as client:
        stream = client.chat.completions.create(
            model="llama3.2",
            messages=CHAT,
            stream=True,
            max_tokens=20,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            arrivals.append(time.monotonic())
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
    assert usage is not None
    assert usage.completion_tokens == sum(1 for t in text if t)
    assert arrivals[-1] - arrivals[0] > 0.4


def test_openai_completions_embeddings_and_models(
    native: ollama.Client, oai: openai.OpenAI
) -> None:
    """Completions, embeddings, model list and model lookup all work."""
    client = oai
    completion = client.completions.create(model="llama3.2", prompt="Once upon a time")
    assert completion.choices[0].text
    embedding = client.embeddings.create(model="all-minilm", input="hello")
    assert embedding.data[0].embedding
    ids = [m.id for m in client.models.list()]
    assert "llama3.2:latest" in ids
    assert client.models.retrieve("llama3.2:latest").id == "llama3.2:latest"


def test_upstream_errors_keep_their_shape(native: ollama.Client, oai: openai.OpenAI) -> None:
    """An unknown model is Ollama's own 404, passed through in the surface's format."""
    with pytest.raises(ollama.ResponseError) as refused:
        native.chat(model="nope", messages=CHAT, stream=False)
    assert refused.value.status_code == 404
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(
            model="nope",
            messages=CHAT,
        )


def test_requests_reach_ollama_without_credentials(
    native: ollama.Client, cli_key: str, standin_log: StandinLog
) -> None:
    """The stand-in sees the request and policyd's headers, never the key or body copy."""
    native.chat(model="llama3.2", messages=CHAT, stream=False)
    (seen,) = standin_log.requests()
    headers = seen["headers"]
    assert seen["raw_path"] == "/api/chat"
    assert "authorization" not in headers
    assert "x-nz-body" not in headers
    assert parse_grant(headers[H_GRANT.lower()])["prefix"] == cli_key[:11]
    assert cli_key not in str(seen)

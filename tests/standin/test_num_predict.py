"""How many tokens a generation may produce: Ollama 0.32.15's bound on num_predict.

Checked against Ollama's source (the version compose pins): `llm/llama_server.go`
boundedNumPredict (a negative num_predict, or one above ten context windows, becomes ten
windows; 0 is passed on and, omitted from llama-server's request, bounds nothing), the
window as `server/routes.go` modelOptions, `server/sched.go` getRunner and `llm/server.go`
NewLlamaServer size it, and `openai/openai.go` (only `max_tokens` maps to num_predict).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from compose.standin.inference import Job, output_bound, prepare_generate, runner_context
from compose.standin.settings import StandinSettings
from compose.standin.state import ServerState
from tests.standin.expect import chat_reply, generate_reply

PROMPT = "Tell me about rivers."  # llama3.2's reply to it: 239 tokens
FULL = len(generate_reply("llama3.2:latest", PROMPT))
TURNS = [("user", PROMPT)]


@pytest.mark.parametrize(
    ("num_predict", "window", "expected"),
    [
        (-1, 4096, 40960),  # the default: open-ended, ten windows
        (-2, 4096, 40960),  # not "fill the context": any negative is open-ended
        (-1000, 2048, 20480),
        (0, 4096, None),  # passed on as 0, which llama-server's request omits: no bound
        (100, 2048, 100),
        (20480, 2048, 20480),  # ten windows exactly is kept
        (20481, 2048, 20480),
        (30000, 2048, 20480),
    ],
)
def test_output_bound(num_predict: int, window: int, expected: int | None) -> None:
    """boundedNumPredict: negative or above ten windows → ten windows; 0 → no bound."""
    assert output_bound(num_predict, window) == expected


@pytest.mark.parametrize(
    ("model", "options", "expected"),
    [
        ("llama3.2", None, 4096),  # the server default (below 23 GiB of VRAM)
        ("llama3.2", {"num_ctx": None}, 4096),  # null is skipped by Options.FromMap
        ("llama3.2", {"num_ctx": 0}, 4),  # a named 0 is kept, then raised to 4
        ("llama3.2", {"num_ctx": -5}, 4),
        ("llama3.2", {"num_ctx": 2.9}, 4),  # floats are truncated
        ("llama3.2", {"num_ctx": 23.9}, 23),
        ("llama3.2", {"num_ctx": 8192}, 8192),
        ("llama3.2", {"num_ctx": 200_000}, 131_072),  # at most the training context
        ("qwen2.5-coder:7b", {"num_ctx": 40_000}, 32_768),
    ],
)
def test_runner_context(model: str, options: Any, expected: int) -> None:
    """The window the bound counts in is the runner's, as Ollama sizes it."""
    card = ServerState(StandinSettings()).catalogue.find(model)
    assert card is not None
    assert runner_context(card, options) == expected


def _job(options: dict[str, Any]) -> Job:
    job = prepare_generate(
        ServerState(StandinSettings()),
        {"model": "llama3.2", "prompt": PROMPT, "stream": False, "options": options},
    )
    assert isinstance(job, Job)
    return job


@pytest.mark.parametrize(
    ("options", "limit"),
    [
        ({"num_ctx": 4}, 40),  # absent: -1, ten windows of 4
        ({"num_predict": -1, "num_ctx": 4}, 40),
        ({"num_predict": -2, "num_ctx": 4}, 40),
        ({"num_predict": -2, "num_ctx": 0}, 40),
        ({"num_predict": 300, "num_ctx": 20}, 200),
        ({"num_predict": 50, "num_ctx": 20}, 50),
        ({"num_predict": 50.9}, 50),
        ({"num_predict": 0, "num_ctx": 4}, FULL),  # 0 bounds nothing, even in a tiny window
        ({"num_predict": 0.7, "num_ctx": 4}, FULL),  # truncated to 0
        ({"num_predict": -1}, FULL),  # 40960 tokens: more than any stand-in reply
    ],
)
def test_generation_is_cut_at_the_bound(options: dict[str, Any], limit: int) -> None:
    """A reply longer than the bound stops there with done_reason length, else runs out."""
    assert FULL == 239
    job = _job(options)
    assert job.limit == limit
    assert job.done_reason == ("length" if limit < FULL else "stop")


def test_native_bound_over_http(http: httpx.Client) -> None:
    """/api/generate and /api/chat: -2 in a 4-token window gives 40 tokens; 0 the whole reply."""
    cut = http.post(
        "/api/generate",
        json={"model": "llama3.2", "prompt": PROMPT, "stream": False,
              "options": {"num_predict": -2, "num_ctx": 4}},
    ).json()  # fmt: skip
    assert (cut["eval_count"], cut["done_reason"]) == (40, "length")
    assert cut["response"] == "".join(generate_reply("llama3.2:latest", PROMPT, 40))
    whole = http.post(
        "/api/chat",
        json={"model": "llama3.2", "messages": [{"role": "user", "content": PROMPT}],
              "stream": False, "options": {"num_predict": 0, "num_ctx": 4}},
    ).json()  # fmt: skip
    expected = chat_reply("llama3.2:latest", TURNS)
    assert (whole["eval_count"], whole["done_reason"]) == (len(expected), "stop")
    assert whole["message"]["content"] == "".join(expected)


@pytest.mark.parametrize(
    ("fields", "tokens"),
    [
        ({"max_tokens": 5}, 5),
        ({"max_tokens": 0}, None),  # num_predict 0: no bound
        ({"max_tokens": -1}, None),  # ten default windows
        ({"max_tokens": None}, None),
        ({"max_completion_tokens": 5}, None),  # Ollama's OpenAI layer ignores it
    ],
)
def test_openai_max_tokens_is_num_predict(
    http: httpx.Client, fields: dict[str, Any], tokens: int | None
) -> None:
    """/v1/chat/completions: only a non-null max_tokens becomes num_predict."""
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": PROMPT}], **fields}
    reply = http.post("/v1/chat/completions", json=body).json()
    expected = chat_reply("llama3.2:latest", TURNS, tokens)
    assert reply["usage"]["completion_tokens"] == len(expected)
    assert reply["choices"][0]["message"]["content"] == "".join(expected)
    assert reply["choices"][0]["finish_reason"] == ("stop" if tokens is None else "length")

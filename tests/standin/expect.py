"""What the stand-in must answer, recomputed from its public rules."""

from __future__ import annotations

from collections.abc import Sequence

from compose.standin.textgen import reply_for
from compose.standin.tokenizer import (
    ChatTurn,
    count_tokens,
    render_chat,
    render_generate,
)

__all__ = ["chat_prompt_tokens", "chat_reply", "generate_reply", "prompt_with"]


def chat_reply(model: str, turns: Sequence[ChatTurn], limit: int | None = None) -> list[str]:
    """The tokens a chat gets from `model` (canonical name), cut at `limit`."""
    tokens = reply_for(model, render_chat(turns)).tokens
    return list(tokens if limit is None else tokens[:limit])


def chat_prompt_tokens(turns: Sequence[ChatTurn]) -> int:
    """prompt_eval_count / prompt_tokens of a chat."""
    return count_tokens(render_chat(turns))


def generate_reply(model: str, prompt: str, limit: int | None = None) -> list[str]:
    """The tokens a generate request gets from `model`, cut at `limit`."""
    tokens = reply_for(model, render_generate(prompt)).tokens
    return list(tokens if limit is None else tokens[:limit])


def prompt_with(model: str, needle: str) -> str:
    """A generate prompt whose (full) reply contains `needle`."""
    for number in range(2000):
        prompt = f"question number {number}"
        if needle in "".join(generate_reply(model, prompt)):
            return prompt
    raise AssertionError(f"no reply of {model} contains {needle!r}")

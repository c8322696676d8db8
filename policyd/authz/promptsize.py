"""How many tokens a request body makes Ollama process before it writes a word.

The reservation must hold everything Ollama tokenises, not only the prompt text: the
`context` ids of a generate call (tokens already, counted exactly), images (each costs a
model-dependent number of tokens; the operator sets one figure, `NZ_IMAGE_TOKENS`),
tools, `system`, `template`, `suffix`, `format`, and the tool calls of earlier turns.
Text is counted generously (one token per three UTF-8 bytes: three ASCII characters, one
CJK character) so the estimate stays above what real tokenisers produce for ordinary
text. meterd estimates streamed prompts from this count (the grant's `prompt`), so only
what Ollama tokenises may count: JSON whitespace, escapes and unknown fields never do.
"""

from __future__ import annotations

import json
from typing import Any, Final

__all__ = ["CHARS_PER_TOKEN", "PER_MESSAGE_TOKENS", "PER_PROMPT_TOKENS", "prompt_tokens"]

#: A rough, deliberately generous characters-per-token ratio for sizing prompts.
CHARS_PER_TOKEN: Final = 3
#: The chat template's framing of one message (role markers, separators).
PER_MESSAGE_TOKENS: Final = 4
#: The template's framing of a bare prompt (generate, completions), likewise.
PER_PROMPT_TOKENS: Final = 4
#: Top-level text fields Ollama renders into the prompt.
_TEXT_FIELDS: Final = ("prompt", "system", "suffix", "input", "template")
#: Top-level structured fields rendered into the prompt as JSON (tool schemas, the
#: grammar of a structured `format`).
_JSON_FIELDS: Final = ("tools", "format", "functions")
#: Where message and content-part objects keep their text.
_PART_TEXT: Final = ("content", "text", "thinking", "reasoning")


def _utf8_len(text: str) -> int:
    # isascii() is O(1) on str; other scripts take more bytes and more tokens per character.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _json_chars(value: Any) -> int:
    if value is None:
        return 0
    if type(value) is str:
        return _utf8_len(value)
    # Tool schemas and formats are small next to the text; their JSON length is a fair
    # (high) stand-in for what the template writes.
    return len(json.dumps(value, separators=(",", ":")))


def _is_image_part(part: dict[str, Any]) -> bool:
    return part.get("type") in ("image_url", "input_image") or "image_url" in part


class _Counter:
    """Walks messages once: characters of text, images, and structured extras."""

    __slots__ = ("chars", "images")

    def __init__(self) -> None:
        self.chars = 0
        self.images = 0

    def text(self, value: Any) -> None:
        # Exact type checks and loops instead of isinstance() and sum(generator): a long
        # chat walks this for every message. Decoded JSON has no subclasses.
        kind = type(value)
        if kind is str:
            self.chars += _utf8_len(value)
        elif kind is list:
            for item in value:
                if type(item) is str:
                    self.chars += _utf8_len(item)
                else:
                    self.text(item)
        elif kind is dict:
            if _is_image_part(value):
                self.images += 1
                return
            for name in _PART_TEXT:
                part = value.get(name)
                if part is not None:
                    if type(part) is str:
                        self.chars += _utf8_len(part)
                    else:
                        self.text(part)
            images = value.get("images")
            if type(images) is list:
                self.images += len(images)
            calls = value.get("tool_calls")
            if calls is not None:
                self.chars += _json_chars(calls)
            name = value.get("tool_name") or value.get("name")
            if type(name) is str:
                self.chars += _utf8_len(name)


def prompt_tokens(body: dict[str, Any], *, image_tokens: int, templated: bool = True) -> int:
    """Tokens Ollama would process for `body` (an upper estimate; `context` exactly).

    `templated`: the model's template wraps a bare prompt (not so for embeddings).
    """
    counter = _Counter()
    for name in _TEXT_FIELDS:
        value = body.get(name)
        if value is not None:
            counter.text(value)
    for name in _JSON_FIELDS:
        counter.chars += _json_chars(body.get(name))
    images = body.get("images")
    if type(images) is list:
        counter.images += len(images)
    messages = body.get("messages")
    count = 0
    if type(messages) is list:
        counter.text(messages)
        count = len(messages)
    context = body.get("context")
    exact = len(context) if type(context) is list else 0
    text_tokens = -(-counter.chars // CHARS_PER_TOKEN)
    if templated and messages is None and counter.chars:
        text_tokens += PER_PROMPT_TOKENS
    return text_tokens + count * PER_MESSAGE_TOKENS + exact + counter.images * image_tokens

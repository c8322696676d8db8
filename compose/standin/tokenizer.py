"""The stand-in's tokenizer: a small deterministic rule that every test can recompute.

It is not a real BPE vocabulary, only shaped like one, so usage counts look realistic:
about four characters per token for English, one token per CJK/kana/hangul character,
two characters per token for other scripts, one per punctuation mark. The pieces are
substrings of the text and concatenate back to it exactly, which is what lets the server
stream exactly one token per chunk and report counts a test can verify.

How a prompt is rendered before counting (`render_chat`, `render_generate`) is part of
the rule: real chat templates add a few tokens per message, and so does this one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

__all__ = [
    "TOKEN_PATTERN",
    "ChatTurn",
    "count_tokens",
    "render_chat",
    "render_generate",
    "tokenize",
]

_CJK: Final = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"

#: Alternatives are tried left to right at each position; the last one catches anything.
TOKEN_PATTERN: Final = re.compile(
    r" ?[A-Za-z]{1,4}"  # English: a leading space rides on the word, 4 letters a token
    r"| ?[0-9]{1,3}"  # numbers in groups of three digits
    rf"|[{_CJK}]"  # CJK ideographs, kana, hangul: one character each
    rf"| ?[^\W\d_A-Za-z{_CJK}]{{1,2}}"  # other letters (accents, Cyrillic, Greek…): two
    r"|\n+"  # a run of newlines
    r"|[ \t]{1,4}"  # indentation and other blanks, four at a time
    r"|.",  # everything else (punctuation, symbols, emoji): one character each
    re.DOTALL,
)

#: One chat message as the template sees it: (role, content).
ChatTurn = tuple[str, str]


def tokenize(text: str) -> list[str]:
    """Split `text` into tokens; `"".join(tokenize(t)) == t` always holds."""
    return TOKEN_PATTERN.findall(text)


def count_tokens(text: str) -> int:
    """How many tokens `text` is, by the rule in `tokenize`."""
    return len(TOKEN_PATTERN.findall(text)) if text else 0


def render_chat(turns: Iterable[ChatTurn]) -> str:
    """The prompt text a chat becomes: one `role: content` line per message, then the cue."""
    lines = [f"{role}: {content}" for role, content in turns]
    lines.append("assistant:")
    return "\n".join(lines)


def render_generate(
    prompt: str,
    *,
    system: str = "",
    suffix: str = "",
    raw: bool = False,
) -> str:
    """The prompt text a generate request becomes (`raw` skips the template).

    A request's `context` (token ids of an earlier exchange) is already tokens: the caller
    adds its length to the count instead of rendering it.
    """
    if raw:
        return prompt + suffix
    head = f"system: {system}\n" if system else ""
    tail = f"\nsuffix: {suffix}" if suffix else ""
    return f"{head}user: {prompt}{tail}\nassistant:"

"""The body encoder writes what the standard library writes, only faster."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.authz.normalise import serialise

__all__: list[str] = []

# Every code point, lone surrogates included: a client's JSON may carry "\ud800".
_ANY_CHAR = st.characters(exclude_categories=())
_TEXT = st.text(_ANY_CHAR, max_size=40) | st.text(max_size=300)
_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT
)
# No floats and no DEL: msgspec writes 1e16 where the standard library writes 1e+16,
# and DEL raw where it writes \u007f; everything else must come out byte for byte.
_EXACT_SCALAR = st.none() | st.booleans() | st.integers() | _TEXT.filter(lambda s: "\x7f" not in s)


def _json(scalars: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=6) | st.dictionaries(_TEXT, inner, max_size=6),
        max_leaves=30,
    )


def _standard(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=True, separators=(",", ":"))


@settings(max_examples=400)
@given(body=st.dictionaries(_TEXT, _json(_SCALAR), max_size=6))
def test_serialised_body_is_ascii_json_of_the_same_value(body: dict[str, Any]) -> None:
    """Whatever the body holds, the output is ASCII-only and reads back as the value the
    standard library's ASCII-escaped JSON reads back as."""
    text = serialise(body)
    assert text.isascii()
    assert json.loads(text) == json.loads(_standard(body))


@settings(max_examples=400)
@given(body=st.dictionaries(_TEXT, _json(_EXACT_SCALAR), max_size=6))
def test_serialised_body_is_byte_for_byte_the_standard_one(body: dict[str, Any]) -> None:
    """Without floats, the output is exactly `json.dumps(ensure_ascii=True)`'s compact
    form: same escapes, surrogate pairs and lowercase hex for every non-ASCII code point."""
    assert serialise(body) == _standard(body)


@given(text=st.text(st.characters(min_codepoint=0x80), min_size=1, max_size=50))
def test_a_mostly_ascii_conversation_escapes_only_its_non_ascii_text(text: str) -> None:
    """A long ASCII conversation with one non-ASCII message (the fast path's case) comes
    out exactly as the standard encoder writes it."""
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": f'turn {i}: plain text "quoted" \\ \n'} for i in range(50)
    ]
    messages[25]["content"] += text
    body = {"model": "m", "messages": messages, "options": {"num_predict": 5}}
    assert serialise(body) == _standard(body)

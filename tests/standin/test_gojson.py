"""Go-compatible JSON: binding errors, key matching, escaping, times and durations."""

from __future__ import annotations

import re

import pytest

from compose.standin.gojson import (
    BindError,
    bind,
    encode,
    go_duration_seconds,
    go_quote,
    go_time,
)
from compose.standin.schemas import CHAT_REQUEST, GENERATE_REQUEST


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "unexpected EOF"),
        (b'{"model":"a",}', "invalid character '}' looking for beginning of object key string"),
        (b"\xef\xbb\xbf{}", "invalid character 'ï' looking for beginning of value"),
        (b'{"a":NaN}', "invalid character 'N' looking for beginning of value"),
        (b'{"a" 1}', "invalid character '1' after object key"),
        (b'{"a":tru}', "invalid character '}' in literal true (expecting 'e')"),
        (b"[1]", "json: cannot unmarshal array into Go value of type api.GenerateRequest"),
        (
            b'{"stream":"false"}',
            "json: cannot unmarshal string into Go struct field GenerateRequest.stream"
            " of type bool",
        ),
        (
            b'{"model":123}',
            "json: cannot unmarshal number into Go struct field GenerateRequest.model"
            " of type string",
        ),
        (
            b'{"context":[1.5]}',
            "json: cannot unmarshal number 1.5 into Go struct field GenerateRequest.context"
            " of type int",
        ),
    ],
)
def test_bind_errors_carry_go_messages(body: bytes, message: str) -> None:
    """A body Go would reject fails with encoding/json's message."""
    with pytest.raises(BindError) as caught:
        bind(body, GENERATE_REQUEST)
    assert str(caught.value) == message
    assert not caught.value.empty


@pytest.mark.parametrize("body", [b"", b" \n\t"])
def test_empty_body_is_eof(body: bytes) -> None:
    """No body at all is io.EOF (Ollama answers `missing request body`)."""
    with pytest.raises(BindError) as caught:
        bind(body, GENERATE_REQUEST)
    assert caught.value.empty
    assert str(caught.value) == "EOF"


def test_nested_type_errors_name_the_innermost_struct() -> None:
    """Go names the innermost struct and the full field path."""
    with pytest.raises(BindError, match=r"Go struct field Message\.messages\.content of type"):
        bind(b'{"messages":[{"role":"user","content":5}]}', CHAT_REQUEST)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"model":"a","Model":"b"}', {"model": "b"}),  # case-insensitive, last wins
        (b'{"Model":"b","model":"a"}', {"model": "a"}),
        ('{"\u017ftream":false}'.encode(), {"stream": False}),  # long s folds to s
        (b'{"model":"a"} {"model":"b"}', {"model": "a"}),  # only the first value
        (b'{"model":"a"}junk', {"model": "a"}),
        (b'{"model":"\xff"}', {"model": "\ufffd"}),  # invalid UTF-8 becomes U+FFFD
        (b'{"model":"a","unknown":1}', {"model": "a"}),  # unknown keys are dropped
        (b"null", {}),
    ],
)
def test_bind_copies_go_decoding(body: bytes, expected: dict[str, object]) -> None:
    """Bodies Go accepts bind to what Go's struct would hold."""
    assert bind(body, GENERATE_REQUEST) == expected


def test_encode_escapes_like_go() -> None:
    """`<`, `>`, `&`, U+2028 and U+2029 are escaped inside strings."""
    assert encode({"a": "<b>&\u2028\u2029"}) == (b'{"a":"\\u003cb\\u003e\\u0026\\u2028\\u2029"}')


def test_go_time_format() -> None:
    """Times are UTC RFC 3339 with trailing zeros of the nanoseconds trimmed."""
    assert go_time(1_785_576_600 * 10**9) == "2026-08-01T09:30:00Z"
    assert go_time(1_785_576_600 * 10**9 + 120_000_000) == "2026-08-01T09:30:00.12Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z", go_time())


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        (300, 300.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("0", 0.0),
        (-1, float("inf")),
        ("-1s", float("inf")),
    ],
)
def test_keep_alive_durations(value: object, seconds: float | None) -> None:
    """keep_alive is seconds or a Go duration; negative means forever."""
    assert go_duration_seconds(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("30", 'time: missing unit in duration "30"'),
        ("abc", 'time: invalid duration "abc"'),
        (True, "Unsupported type: 'bool'"),
    ],
)
def test_bad_keep_alive(value: object, message: str) -> None:
    """Bad keep_alive values fail with Go's messages."""
    with pytest.raises(BindError, match=re.escape(message)):
        go_duration_seconds(value)


def test_go_quote() -> None:
    """%q escapes quotes, backslashes and control characters."""
    assert go_quote('a"b\\c\n\x00') == '"a\\"b\\\\c\\n\\x00"'

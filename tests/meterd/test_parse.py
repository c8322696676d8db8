"""parse.py: real Caddy lines become events; damaged and hostile lines never hurt."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest

from meterd.parse import BadLine, Event, parse_line
from policyd.shared.contract import LOG_GRANT
from tests.meterd.lines import (
    KEY_ID,
    KEY_PREFIX,
    REAL_LINE,
    TENANT_ID,
    caddy_line,
    encode,
    with_grant_values,
)


def _event(raw: bytes, *, truncated: bool = False) -> Event:
    parsed = parse_line(raw, truncated=truncated)
    assert isinstance(parsed, Event), parsed
    return parsed


def test_real_caddy_line_parses() -> None:
    """A line written by Caddy 2.11.7 yields its id, timing, sizes, client and no identity."""
    event = _event(REAL_LINE)
    assert event.request_id == uuid.UUID("c5d69ea4-7607-4977-ad8b-c39a487e26f9")
    assert event.method == "POST"
    assert event.path == "/api/chat"
    assert (event.status, event.bytes_in, event.bytes_out) == (200, 3, 24)
    assert event.duration_ms == 203
    assert event.ttfb_ms == 51
    assert event.client_ip == "127.0.0.1"
    assert event.user_agent == "curl/7.88.1"
    ended = dt.datetime.fromtimestamp(1795697863.4316487, dt.UTC)
    assert abs((ended - event.started).total_seconds() - 0.203334149) < 1e-3
    assert not event.admitted


def test_gateway_fields_are_read() -> None:
    """policyd's grant becomes the event's identity, model, flags."""
    event = _event(
        encode(
            caddy_line(
                path="/v1/chat/completions?x=secret",
                stream=False,
                prompt_log=True,
                reserved=4242,
                model="Llama3.2:Latest",
            )
        )
    )
    assert event.admitted
    assert str(event.key_id) == KEY_ID
    assert str(event.tenant_id) == TENANT_ID
    assert event.key_prefix == KEY_PREFIX
    assert event.surface == "openai"
    assert event.model == "Llama3.2:Latest"
    assert event.stream is False
    assert event.prompt_log
    assert event.reserved == 4242
    assert event.path == "/v1/chat/completions"  # the query string is never kept


def test_refusal_reason_from_policyd_header() -> None:
    """A refused request has no key fields but carries policyd's X-Nz-Refusal code."""
    event = _event(encode(caddy_line(admitted=False, status=429, refusal="daily_budget_exhausted")))
    assert not event.admitted
    assert event.refusal == "daily_budget_exhausted"
    assert event.status == 429


def test_probe_is_recognised() -> None:
    """Health probes without a key are marked, so the daemon can leave them out."""
    event = _event(encode(caddy_line(admitted=False, path="/healthz", method="GET")))
    assert event.is_probe


def _mutated(**changes: object) -> bytes:
    line = caddy_line()
    for name, value in changes.items():
        if value is _DROP:
            line.pop(name, None)
        else:
            line[name] = value
    return encode(line)


_DROP = object()

_BAD_LINES = {
    "empty": b"",
    "blank": b"   ",
    "not json": b"hello world",
    "truncated json": encode(caddy_line())[:-40],
    "array": b"[1,2,3]",
    "string": b'"uuid"',
    "invalid utf-8": b'{"uuid":"\xff\xfe"}',
    "nan": b'{"ts":NaN}',
    "deep nesting": b"[" * 100_000,
    "huge number": b'{"ts":1e999}',
    "no uuid": _mutated(uuid=_DROP),
    "uuid not a uuid": _mutated(uuid="not-a-uuid-but-long-enough-to-look-like-one"),
    "uuid wrong type": _mutated(uuid=12345),
    "no ts": _mutated(ts=_DROP),
    "ts string": _mutated(ts="yesterday"),
    "ts in 1970": _mutated(ts=5.0),
    "ts far future": _mutated(ts=1e15),
    "status missing": _mutated(status=_DROP),
    "status string": _mutated(status="200"),
    "status too big": _mutated(status=100_000),
    "status negative": _mutated(status=-1),
    "status bool": _mutated(status=True),
    "request missing": _mutated(request=_DROP),
    "request a list": _mutated(request=[1]),
    "uri missing": encode({**caddy_line(), "request": {"method": "GET"}}),
}


@pytest.mark.parametrize("raw", _BAD_LINES.values(), ids=list(_BAD_LINES))
def test_malformed_lines_are_bad_lines(raw: bytes) -> None:
    """Each malformed line becomes a BadLine with a reason, never an exception."""
    parsed = parse_line(raw)
    assert isinstance(parsed, BadLine)
    assert parsed.reason
    assert b"\n" not in parsed.reason.encode()


_HOSTILE = {
    "NUL in uri": {"request": {**caddy_line()["request"], "uri": "/api/chat\x00x"}},
    "huge uri": {"request": {**caddy_line()["request"], "uri": "/" + "a" * 100_000}},
    "lone surrogate ua": {
        "request": {**caddy_line()["request"], "headers": {"User-Agent": ["\ud800x"]}}
    },
    "huge ua": {"request": {**caddy_line()["request"], "headers": {"User-Agent": ["u" * 10**5]}}},
    "ua not a list": {"request": {**caddy_line()["request"], "headers": {"User-Agent": "x"}}},
    "bad client ip": {"request": {**caddy_line()["request"], "client_ip": "999.1.1.1; DROP"}},
    "bad method": {"request": {**caddy_line()["request"], "method": "GET /x HTTP/1.1"}},
    "key id not uuid": {LOG_GRANT: with_grant_values(caddy_line(), key="';DROP-TABLE")},
    "grant not a string": {LOG_GRANT: ["x"]},
    "grant without pairs": {LOG_GRANT: "= == x"},
    "prefix hostile": {LOG_GRANT: with_grant_values(caddy_line(), prefix="nz_<script>")},
    "surface unknown": {LOG_GRANT: with_grant_values(caddy_line(), surface="soap")},
    "model huge": {LOG_GRANT: with_grant_values(caddy_line(), model="m" * 10_000)},
    "model NUL": {LOG_GRANT: with_grant_values(caddy_line(), model="llama\x003")},
    "stream odd": {LOG_GRANT: with_grant_values(caddy_line(), stream="yes")},
    "reserved negative": {LOG_GRANT: with_grant_values(caddy_line(), reserved="-5")},
    "reserved huge": {LOG_GRANT: with_grant_values(caddy_line(), reserved="9" * 40)},
    "size negative": {"size": -1},
    "size float": {"size": 1.5e300},
    "duration negative": {"duration": -3},
    "duration string": {"duration": "1s"},
    "ttfb string": {"ttfb_ms": "soon"},
    "ttfb huge": {"ttfb_ms": 1e300},
    "refusal hostile": {"resp_headers": {"X-Nz-Refusal": ["<b>bad</b>" * 20]}},
    "resp_headers a string": {"resp_headers": "x"},
    "resp_body not a string": {"resp_body": {"eval_count": 5}},
    "req_body number": {"req_body": 5},
}


@pytest.mark.parametrize("changes", _HOSTILE.values(), ids=list(_HOSTILE))
def test_hostile_values_are_bounded(changes: dict[str, object]) -> None:
    """Hostile field values become NULL or bounded text that Postgres can store."""
    event = _event(encode({**caddy_line(), **changes}))
    for value in (event.path, event.user_agent, event.model, event.key_prefix, event.refusal):
        if value is not None:
            assert "\x00" not in value
            value.encode("utf-8")  # no lone surrogates
            assert len(value) <= 2048
    assert event.bytes_out >= 0
    assert event.duration_ms >= 0
    assert event.reserved is None or 0 <= event.reserved < 10**18
    assert event.ttfb_ms is None or event.ttfb_ms >= 0
    assert event.status == 200


def test_truncated_line_keeps_its_metadata() -> None:
    """A line cut to its head (response body too long) still yields the request's event."""
    raw = encode(caddy_line(stream=False, resp_body='{"eval_count": 5, "x": "' + "y" * 5000))
    event = _event(raw[:1000], truncated=True)
    assert event.truncated
    assert event.resp_body is None
    assert event.admitted


def test_truncated_line_without_body_field_is_bad() -> None:
    """A cut line whose head does not reach the response body cannot be trusted."""
    raw = encode(caddy_line())
    assert isinstance(parse_line(raw[:200], truncated=True), BadLine)


def test_request_body_written_twice_keeps_the_first() -> None:
    """Caddy without `<` logs req_body early and again, empty, at the end: the first counts."""
    raw = encode(caddy_line(req_body="hello"))[:-1] + b',"req_body":""}'
    assert json.loads(raw)["req_body"] == ""
    assert _event(raw).req_body == "hello"


def test_empty_request_body_is_no_prompt() -> None:
    """An empty req_body means there is no prompt to store."""
    assert _event(encode(caddy_line(req_body=""))).req_body is None

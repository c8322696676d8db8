"""usage.py and envelope.py: exact counts from captured bodies, estimates from sizes."""

from __future__ import annotations

import json

import pytest

from compose.standin.gojson import encode as go_encode
from meterd.envelope import envelope_for, go_json_len
from meterd.parse import Event, parse_line
from meterd.usage import (
    SUMS,
    Calibration,
    CalibrationRow,
    Observation,
    Source,
    exact_counts,
    measure,
    model_key,
)
from policyd.shared.tables import CALIBRATION_SUMS, meter_calibration
from tests.meterd.lines import caddy_line, encode


def _event(**fields: object) -> Event:
    parsed = parse_line(encode(caddy_line(**fields)))  # type: ignore[arg-type]
    assert isinstance(parsed, Event)
    return parsed


_BODIES = {
    "native generate": (
        '{"model":"llama3.2","created_at":"2026-08-21T10:00:00Z","response":"Hi","done":true,'
        '"done_reason":"stop","context":[1,2],"prompt_eval_count":26,"eval_count":259}',
        (26, 259),
    ),
    "native chat": (
        '{"model":"m","message":{"role":"assistant","content":"x"},"done":true,'
        '"prompt_eval_count":26,"eval_count":282}',
        (26, 282),
    ),
    "native zero counts omitted": ('{"model":"m","done":true,"done_reason":"load"}', (0, 0)),
    "embed": ('{"model":"all-minilm","embeddings":[[0.1]],"prompt_eval_count":8}', (8, 0)),
    "openai chat": (
        '{"id":"chatcmpl-1","choices":[{"message":{"content":"x"}}],'
        '"usage":{"prompt_tokens":26,"completion_tokens":282,"total_tokens":308}}',
        (26, 282),
    ),
    "openai embeddings": (
        '{"object":"list","data":[],"usage":{"prompt_tokens":5,"total_tokens":5}}',
        (5, 0),
    ),
    "native error": ('{"error":"model \'x\' not found"}', (0, 0)),
    "openai error": ('{"error":{"message":"bad","type":"invalid_request_error"}}', (0, 0)),
    "ndjson after all": (
        '{"response":"a","done":false}\n{"done":true,"prompt_eval_count":3,"eval_count":1}\n',
        (3, 1),
    ),
}


@pytest.mark.parametrize(("body", "expected"), _BODIES.values(), ids=list(_BODIES))
def test_exact_counts_from_captured_bodies(body: str, expected: tuple[int, int]) -> None:
    """Ollama's own counts are read from every captured reply shape."""
    counted = exact_counts(body)
    assert counted is not None
    assert counted[:2] == expected


@pytest.mark.parametrize(
    "body", ["", "not json", "[1,2]", '{"usage":{"prompt_tokens":"many"}}', '{"hello":1}']
)
def test_unreadable_capture_is_charged_at_the_reservation(body: str) -> None:
    """A capture without counts is settled fail-closed at what admission reserved."""
    usage = measure(_event(stream=False, resp_body=body, reserved=900), Calibration()).usage
    assert usage.source is Source.RESERVED
    assert usage.total == 900


def test_captured_body_gives_exact_usage_and_an_observation() -> None:
    """A captured non-streamed chat is exact, and teaches the model's bytes per token."""
    body = json.dumps(
        {"message": {"content": "Hello <b>"}, "done": True, "prompt_eval_count": 7, "eval_count": 4}
    )
    measured = measure(_event(stream=False, resp_body=body, bytes_read=90), Calibration())
    assert (measured.usage.prompt_tokens, measured.usage.completion_tokens) == (7, 4)
    assert measured.usage.source is Source.EXACT
    assert measured.observation == Observation(
        model="llama3.2:latest",
        path="/api/chat",
        prompt_bytes=90,
        prompt_tokens=7,
        content_bytes=go_json_len("Hello <b>"),
        completion_tokens=4,
    )


@pytest.mark.parametrize(
    ("fields", "source", "total"),
    [
        ({"admitted": False, "status": 401, "refusal": "invalid_api_key"}, Source.EXACT, 0),
        ({"path": "/api/tags", "method": "GET", "stream": False}, Source.EXACT, 0),
        ({"stream": True, "status": 404, "size": 40}, Source.ESTIMATED, 0),
        ({"stream": False, "reserved": 300}, Source.RESERVED, 300),
        ({"stream": False, "reserved": None}, Source.RESERVED, 0),
        ({"path": "/api/embeddings", "stream": False, "bytes_read": 100}, Source.ESTIMATED, 20),
    ],
    ids=[
        "refused",
        "info endpoint",
        "stream error",
        "capture missing",
        "nothing reserved",
        "legacy embeddings",
    ],
)
def test_where_usage_comes_from(fields: dict[str, object], source: Source, total: int) -> None:
    """Each kind of line is settled from the right source."""
    usage = measure(_event(**fields), Calibration()).usage
    assert usage.source is source
    assert usage.total == total


@pytest.mark.parametrize(
    "text",
    [
        "plain",
        'quote " and \\ slash',
        "tab\tnew\nline\r",
        "<html> & </html>",
        "\x01\x1f",
        "東京 Москва 🚀",
        "line\u2028sep\u2029",
    ],
)
def test_go_json_len_matches_gos_encoder(text: str) -> None:
    """Reply bytes are counted exactly as Go's json.Marshal writes them."""
    assert go_json_len(text) == len(go_encode(text)) - 2


@pytest.mark.parametrize(
    "path", ["/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions"]
)
def test_estimate_inverts_the_envelope(path: str) -> None:
    """A stream of N chunks of known text size is estimated as N tokens."""
    calibration = Calibration()
    obs = Observation(
        model="llama3.2:latest",
        path=path,
        prompt_bytes=0,
        prompt_tokens=0,
        content_bytes=400,
        completion_tokens=100,
    )
    calibration.learn(obs)
    envelope = envelope_for(path, "llama3.2")
    tokens = 250
    size = round(envelope.fixed + tokens * (envelope.per_chunk + 4.0))
    if envelope.context:
        size += round(calibration.context_bytes_per_token("llama3.2:latest") * tokens)
    event = _event(path=path, size=size, bytes_read=0, stream=True)
    usage = measure(event, calibration).usage
    assert usage.source is Source.ESTIMATED
    assert usage.completion_tokens == tokens


def test_prompt_fit_is_a_line_over_body_bytes() -> None:
    """Prompt tokens are fitted as overhead + rate * bytes from exact observations."""
    row = CalibrationRow(model="m:latest", path="/api/chat")
    for size in (100, 200, 400, 800, 1600):
        obs = Observation(
            model="m:latest",
            path="/api/chat",
            prompt_bytes=size,
            prompt_tokens=10 + size // 4,
            content_bytes=0,
            completion_tokens=0,
        )
        row = row.learn(obs)
    fitted = row.prompt_tokens_for(1000)
    assert fitted is not None
    assert fitted == pytest.approx(260, rel=0.01)


def test_model_key_folds_like_ollama() -> None:
    """Model spellings that Ollama treats as one model share one calibration."""
    assert model_key("Llama3.2") == model_key("llama3.2:latest") == "llama3.2:latest"
    assert model_key("qwen2.5-coder:7b") == "qwen2.5-coder:7b"
    assert model_key(None) == "?"


def test_calibration_table_has_every_sum() -> None:
    """The stored calibration columns are exactly the sums the estimator keeps."""
    assert CALIBRATION_SUMS == SUMS
    assert set(CALIBRATION_SUMS) <= set(meter_calibration.c.keys())

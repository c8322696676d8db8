"""usage.py and envelope.py: exact counts from captured bodies, estimates from sizes."""

from __future__ import annotations

import pytest

from compose.standin.gojson import encode as go_encode
from meterd.calibration import FIGURES
from meterd.envelope import envelope_for, go_json_len, whole_overhead
from meterd.parse import Event, parse_line
from meterd.usage import (
    Calibration,
    Source,
    exact_counts,
    measure,
    model_key,
)
from policyd.shared.tables import CALIBRATION_FIGURES, meter_calibration
from tests.meterd.lines import TENANT_ID, caddy_line, encode


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
    # What Caddy's log filter keeps of a reply (caddy/gateway.caddy).
    "filtered native": (',"done":true,"prompt_eval_count":19,"eval_count":12,', (19, 12)),
    "filtered zero prompt": (',"done":true,,"eval_count":12,', (0, 12)),
    "filtered embed": (',,"prompt_eval_count":8,,', (8, 0)),
    "filtered openai": (
        ',,,,"usage":{"prompt_tokens":26,"completion_tokens":2,"total_tokens":28}',
        (26, 2),
    ),
    "filtered load": (',"done":true,,,', (0, 0)),
    "filtered error": ('"error",,,,', (0, 0)),
}


@pytest.mark.parametrize(("body", "expected"), _BODIES.values(), ids=list(_BODIES))
def test_exact_counts_from_captured_bodies(body: str, expected: tuple[int, int]) -> None:
    """Ollama's own counts are read from every captured reply shape."""
    counted = exact_counts(body)
    assert counted is not None
    assert counted[:2] == expected


@pytest.mark.parametrize(
    "body",
    ["", "not json", "[1,2]", '{"usage":{"prompt_tokens":"many"}}', '{"hello":1}', ",,,,"],
)
def test_unreadable_capture_is_charged_at_the_reservation(body: str) -> None:
    """A capture without counts is settled fail-closed at what admission reserved."""
    usage = measure(_event(stream=False, resp_body=body, reserved=900), Calibration()).usage
    assert usage.source is Source.RESERVED
    assert usage.total == 900


def test_captured_body_gives_exact_usage_and_an_observation() -> None:
    """A captured non-streamed chat is exact, and teaches its tenant's figures."""
    text = "Hello <b> " * 10
    prompt, completion = 40, 30
    size = round(whole_overhead("/api/chat", "llama3.2", prompt=prompt, completion=completion))
    size += go_json_len(text)
    body = f',"done":true,"prompt_eval_count":{prompt},"eval_count":{completion},'
    event = _event(stream=False, resp_body=body, bytes_read=90, size=size, counted=50)
    measured = measure(event, Calibration())
    assert (measured.usage.prompt_tokens, measured.usage.completion_tokens) == (40, 30)
    assert measured.usage.source is Source.EXACT
    obs = measured.observation
    assert obs is not None
    assert (obs.tenant, obs.model, obs.path) == (TENANT_ID, "llama3.2:latest", "/api/chat")
    assert obs.prompt == pytest.approx(40 / 50)
    assert obs.reply == pytest.approx(go_json_len(text) / completion, abs=0.05)
    assert obs.context is None


@pytest.mark.parametrize(
    ("fields", "source", "total"),
    [
        ({"admitted": False, "status": 401, "refusal": "invalid_api_key"}, Source.EXACT, 0),
        ({"path": "/api/tags", "method": "GET", "stream": False}, Source.EXACT, 0),
        ({"stream": True, "status": 404, "size": 40}, Source.ESTIMATED, 0),
        ({"stream": False, "reserved": 300}, Source.RESERVED, 300),
        ({"stream": False, "reserved": None}, Source.RESERVED, 0),
        (
            {"path": "/api/embeddings", "stream": False, "bytes_read": 100, "counted": 20},
            Source.ESTIMATED,
            22,  # policyd's count at the prior ratio (1.1)
        ),
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
    envelope = envelope_for(path, "llama3.2")
    tokens = 250
    prompt = calibration.figure("prompt", TENANT_ID, "llama3.2:latest", path) * 100
    size = round(envelope.fixed + tokens * (envelope.per_chunk + 4.0))
    if envelope.context:
        size += round(6.0 * (tokens + round(prompt)))
    event = _event(path=path, size=size, bytes_read=0, stream=True, counted=100)
    usage = measure(event, calibration).usage
    assert usage.source is Source.ESTIMATED
    assert usage.prompt_tokens == round(prompt)
    assert usage.completion_tokens == tokens


def test_model_key_folds_like_ollama() -> None:
    """Model spellings that Ollama treats as one model share one calibration."""
    assert model_key("Llama3.2") == model_key("llama3.2:latest") == "llama3.2:latest"
    assert model_key("registry.ollama.ai/library/llama3.2:latest") == "llama3.2:latest"
    assert model_key("library/LLAMA3.2") == "llama3.2:latest"
    assert model_key("qwen2.5-coder:7b") == "qwen2.5-coder:7b"
    assert model_key("hf.co/org/m:q4") == "hf.co/org/m:q4"
    assert model_key(None) == "?"


def test_calibration_table_has_every_figure() -> None:
    """The stored calibration columns are exactly the figures the estimator keeps."""
    assert CALIBRATION_FIGURES == FIGURES
    for figure in FIGURES:
        assert {f"{figure}_n", f"{figure}_log"} <= set(meter_calibration.c.keys())

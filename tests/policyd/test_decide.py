"""The pre-auth screen and the admission headers."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.authz.records import KeyRecord, Limits
from policyd.authz.refusals import Reason, Refusal, render
from policyd.authz.screening import (
    admit,
    check_key_policy,
    decode_body_header,
    model_allowed,
    normalised_body,
    reservation,
    screen_request,
)
from policyd.shared.contract import H_GRANT, Surface, parse_grant

LIMIT = 1000
DEFAULT_OUTPUT = 1024


def b64(body: object) -> str:
    return base64.b64encode(json.dumps(body).encode()).decode()


def record(*, key_cap: int | None = None, tenant_cap: int | None = None) -> KeyRecord:
    return KeyRecord(
        key_id="k",
        prefix="nz_abcdefgh",
        tenant_id="t",
        tenant_name="acme",
        digest="d",
        expires_at=None,
        revoked=False,
        key_limits=Limits(max_output_tokens=key_cap),
        tenant_limits=Limits(max_output_tokens=tenant_cap, prompt_logging=True),
    )


def test_caddy_error_text_in_the_body_header_means_too_large() -> None:
    """Caddy puts an error string where the base64 body would be when max_size trips."""
    found = decode_body_header("request body: http: request body too large", max_body_bytes=LIMIT)
    assert isinstance(found, Refusal)
    assert found.reason is Reason.TOO_LARGE
    assert found.status == 413


@settings(max_examples=300)
@given(
    st.text(alphabet="ABCDabcd0123+/=- \n\t!\u00e9", max_size=24)
    | st.binary(max_size=18).map(lambda raw: base64.b64encode(raw).decode())
)
def test_body_header_is_as_strict_as_the_standard_decoder(value: str) -> None:
    """The fast decoder accepts exactly what `base64.b64decode(validate=True)` accepts."""
    try:
        expected: bytes | None = base64.b64decode(value, validate=True)
    except ValueError:  # binascii.Error included
        expected = None
    found = decode_body_header(value, max_body_bytes=LIMIT)
    if expected is None:
        assert isinstance(found, Refusal)
        assert found.reason is Reason.TOO_LARGE
    else:
        assert found == expected


def test_decoded_body_over_the_limit_is_too_large() -> None:
    """A valid base64 body longer than the limit is refused with 413."""
    found = decode_body_header(base64.b64encode(b"x" * (LIMIT + 1)).decode(), max_body_bytes=LIMIT)
    assert isinstance(found, Refusal)
    assert found.reason is Reason.TOO_LARGE


def test_missing_body_header_is_not_an_empty_body() -> None:
    """Without Caddy's body copy the request did not come through the gateway: refuse."""
    found = screen_request("POST", "/api/chat", None, max_body_bytes=LIMIT)
    assert found.refusal is not None
    assert found.refusal.reason is Reason.BAD_BODY


@pytest.mark.parametrize("surface_path", ["/api/chat", "/v1/chat/completions"])
def test_too_large_is_rendered_in_the_callers_format(surface_path: str) -> None:
    """413 bodies follow the surface: Ollama `{"error": str}`, OpenAI error object."""
    screened = screen_request("POST", surface_path, "!!!", max_body_bytes=LIMIT)
    assert screened.refusal is not None
    status, body, headers = render(screened.refusal, screened.surface, request_id="r1")
    assert status == 413
    parsed = json.loads(body)
    if screened.surface is Surface.OPENAI:
        assert parsed["error"]["code"] == "request_too_large"
        assert parsed["error"]["type"] == "invalid_request_error"
    else:
        assert "too large" in parsed["error"]
    assert ("x-request-id", "r1") in headers


def test_cloud_model_in_the_models_path_is_forbidden() -> None:
    """`/v1/models/x:cloud` is refused like a cloud model in a body."""
    screened = screen_request("GET", "/v1/models/x%3Acloud", None, max_body_bytes=LIMIT)
    assert screened.refusal is not None
    assert screened.refusal.status == 403


def test_model_names_with_control_characters_are_refused() -> None:
    """Model names travel in headers: CR/LF or spaces would be header injection."""
    body = b64({"model": "llama3.2\r\nX-Nz-Key-Id: evil", "prompt": "x"})
    screened = screen_request("POST", "/api/generate", body, max_body_bytes=LIMIT)
    assert screened.refusal is not None
    assert screened.refusal.reason is Reason.BAD_BODY


def test_non_streamed_generation_is_captured_streamed_is_not() -> None:
    """Only non-streamed bodies are captured into the log for exact usage."""
    for stream, flags in ((False, "cp"), (True, "-p")):  # the tenant logs prompts
        body = b64({"model": "m", "prompt": "hi", "stream": stream})
        screened = screen_request("POST", "/api/generate", body, max_body_bytes=LIMIT)
        ((name, value),) = admit(screened, record())
        assert name == H_GRANT
        grant = parse_grant(value)
        assert grant["stream"] == ("1" if stream else "0")
        assert grant["log"] == flags
        assert grant["model"] == "m"


@pytest.mark.parametrize(
    ("request_cap", "key_cap", "tenant_cap", "output"),
    [
        (10, 20, 30, 10),
        (None, 20, 30, 20),
        (None, None, 30, 30),
        (None, None, None, DEFAULT_OUTPUT),
        (-1, 20, None, 20),
        (0, None, 30, 30),
        (-2, None, None, DEFAULT_OUTPUT),
    ],
)
def test_reservation_uses_request_then_key_then_tenant_cap(
    request_cap: int | None, key_cap: int | None, tenant_cap: int | None, output: int
) -> None:
    """The output part of a reservation is the cap written into the body Ollama receives:
    the request's own if positive, else the key's, the tenant's or the default."""
    body: dict[str, object] = {"model": "m", "prompt": "abc"}
    if request_cap is not None:
        body["options"] = {"num_predict": request_cap}
    screened = screen_request("POST", "/api/generate", b64(body), max_body_bytes=LIMIT)
    key = record(key_cap=key_cap, tenant_cap=tenant_cap)
    normalised = normalised_body(screened, key, default_output=DEFAULT_OUTPUT)
    assert normalised is not None
    assert not isinstance(normalised, Refusal)
    assert json.loads(normalised.body)["options"]["num_predict"] == output
    assert screened.facts is not None
    assert reservation(screened, normalised) == screened.facts.prompt_tokens + output


def test_info_endpoints_need_no_body() -> None:
    """GET endpoints are admitted without reading a body."""
    screened = screen_request("GET", "/api/tags", "", max_body_bytes=LIMIT)
    assert screened.refusal is None
    grant = parse_grant(dict(admit(screened, record()))[H_GRANT])
    assert grant["stream"] == "0"
    assert grant["log"] == "--"
    assert "model" not in grant


@pytest.mark.parametrize(
    ("model", "allowed", "ok"),
    [
        ("llama3.2", ("llama3.2",), True),
        ("llama3.2:1b", ("llama3.2",), True),
        ("LLAMA3.2:Latest", ("llama3.2:latest",), True),
        ("llama3.2", ("llama3.2:latest",), True),
        ("llama3.2:1b", ("llama3.2:latest",), False),
        ("qwen2.5", ("llama3.2",), False),
        ("registry.local:5000/team/m:1", ("registry.local:5000/team/m",), True),
    ],
)
def test_model_allowlist_matches_like_ollama(
    model: str, allowed: tuple[str, ...], ok: bool
) -> None:
    """Entries match case-insensitively; without a tag an entry allows every tag."""
    assert model_allowed(model, allowed) is ok


def test_output_cap_is_refused_not_clamped() -> None:
    """Asking for more output than the key allows is refused with both numbers."""
    body = b64({"model": "m", "prompt": "x", "max_tokens": 10, "max_completion_tokens": 500})
    screened = screen_request("POST", "/v1/completions", body, max_body_bytes=LIMIT)
    refusal = check_key_policy(screened, record(key_cap=100))
    assert refusal is not None
    assert refusal.reason is Reason.OUTPUT_CAP_EXCEEDED
    assert "500" in refusal.message
    assert "100" in refusal.message
    assert check_key_policy(screened, record(key_cap=1000)) is None

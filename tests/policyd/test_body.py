"""Body rules: read bodies as Ollama's Go decoder would, or refuse them."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policyd.authz.body import BodyError, CloudModelError, go_fold, is_cloud_model, read_body
from policyd.authz.normalise import serialise
from policyd.authz.paths import EndpointKind
from policyd.shared.contract import Surface

GEN = EndpointKind.GENERATE
OLLAMA = Surface.OLLAMA
OPENAI = Surface.OPENAI


def facts(body: object, *, surface: Surface = OLLAMA, kind: EndpointKind = GEN) -> object:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return read_body(raw, surface=surface, kind=kind)


def test_native_streams_by_default_and_openai_does_not() -> None:
    """`stream` absent or null streams on /api/*, not on /v1/*."""
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    assert read_body(json.dumps(chat).encode(), surface=OLLAMA, kind=GEN).stream is True
    assert read_body(json.dumps(chat).encode(), surface=OPENAI, kind=GEN).stream is False
    chat["stream"] = None  # type: ignore[assignment]
    assert read_body(json.dumps(chat).encode(), surface=OLLAMA, kind=GEN).stream is True


def test_embeddings_never_stream_and_reserve_no_output() -> None:
    """Embedding endpoints have no output tokens and never stream."""
    found = read_body(
        b'{"model":"all-minilm","input":["a b c"]}', surface=OLLAMA, kind=EndpointKind.EMBED
    )
    assert found.stream is False
    assert found.max_output_tokens == 0
    assert found.prompt_tokens > 0


@pytest.mark.parametrize(
    ("body", "surface", "cap"),
    [
        ({"model": "m", "prompt": "x", "options": {"num_predict": 64}}, OLLAMA, 64),
        ({"model": "m", "prompt": "x", "options": {"num_predict": -1}}, OLLAMA, None),
        ({"model": "m", "prompt": "x"}, OLLAMA, None),
        ({"model": "m", "prompt": "x", "max_tokens": 100}, OPENAI, 100),
        ({"model": "m", "prompt": "x", "max_completion_tokens": 50}, OPENAI, None),
        ({"model": "m", "prompt": "x", "max_tokens": 80, "max_completion_tokens": 90}, OPENAI, 80),
        ({"model": "m", "prompt": "x", "options": {"num_predict": 5}}, OPENAI, None),
    ],
)
def test_output_cap_comes_from_the_surface_field(
    body: object, surface: Surface, cap: object
) -> None:
    """The cap is the field Ollama honours: num_predict natively, max_tokens on /v1."""
    raw = json.dumps(body).encode()
    assert read_body(raw, surface=surface, kind=GEN).max_output_tokens == cap


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"a","model":"b","prompt":"x"}',
        b'{"model":"a","Model":"b","prompt":"x"}',
        b'{"MODEL":"a","prompt":"x"}',
        b'{"model":"a","prompt":"x","STREAM":true}',
        '{"model":"a","prompt":"x","\u017ftream":false}'.encode(),
        b'{"model":"a","prompt":"x","options":{"num_predict":1,"num_predict":9}}',
        b'{"model":"a","messages":[{"role":"user","content":"x","content":"y"}]}',
    ],
)
def test_bodies_go_would_read_differently_are_refused(raw: bytes) -> None:
    """Duplicates and case/fold variants of decision fields are ambiguous: refuse them."""
    with pytest.raises(BodyError):
        read_body(raw, surface=OLLAMA, kind=GEN)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "missing request body"),
        (b"   ", "missing request body"),
        (b"[1]", "must be a JSON object"),
        (b'{"model":"a"', "invalid JSON"),
        (b'{"model":"a"}junk', "invalid JSON"),
        (b'{"model":"a","prompt":NaN}', "not a number"),
        (b'\xef\xbb\xbf{"model":"a"}', "invalid JSON"),
        (b'{"model":"\xff"}', "UTF-8"),
        (b'{"prompt":"x"}', "model is required"),
        (b'{"model":"","prompt":"x"}', "model is required"),
        (b'{"model":"  ","prompt":"x"}', "model is required"),
        (b'{"model":123,"prompt":"x"}', "model must be a string"),
        (b'{"model":"a","stream":"false"}', "stream must be a boolean"),
        (b'{"model":"a","stream":0}', "stream must be a boolean"),
        (b'{"model":"a","options":[]}', "options must be an object"),
        (b'{"model":"a","options":{"num_predict":"5"}}', "num_predict must be an integer"),
        (b'{"model":"a","options":{"num_predict":1.5}}', "num_predict must be an integer"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_malformed_bodies_get_a_clear_message(raw: bytes, message: str) -> None:
    """Every malformed body is refused with a message that says what is wrong."""
    with pytest.raises(BodyError, match=message):
        read_body(raw, surface=OLLAMA, kind=GEN)


@pytest.mark.parametrize(
    ("raw", "surface"),
    [
        (b'{"model":"a","max_tokens":0}', OPENAI),
        (b'{"model":"a","max_tokens":true}', OPENAI),
        (b'{"model":"a","stream_options":{"include_usage":"yes"}}', OPENAI),
    ],
)
def test_openai_fields_are_type_checked(raw: bytes, surface: Surface) -> None:
    """OpenAI-side caps and flags must have the types the API defines."""
    with pytest.raises(BodyError):
        read_body(raw, surface=surface, kind=GEN)


@pytest.mark.parametrize(
    "model", ["gpt-oss:120b-cloud", "deepseek:cloud", "X:CLOUD", " qwen3-cloud ", "m-Cloud"]
)
def test_cloud_models_are_refused(model: str) -> None:
    """Cloud models would run on ollama.com under the server's account: never forwarded."""
    assert is_cloud_model(model)
    with pytest.raises(CloudModelError):
        facts({"model": model, "prompt": "x"})


def test_show_accepts_the_legacy_name_field() -> None:
    """/api/show still takes `name` when `model` is absent, and checks it for cloud."""
    found = read_body(b'{"name":"llama3.2"}', surface=OLLAMA, kind=EndpointKind.SHOW)
    assert found.model == "llama3.2"
    with pytest.raises(CloudModelError):
        read_body(b'{"name":"x:cloud"}', surface=OLLAMA, kind=EndpointKind.SHOW)


def test_prompt_estimate_grows_with_the_prompt() -> None:
    """Longer prompts reserve more tokens; message parts and system text count."""
    short = facts({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    long = facts(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief " * 50},
                {"role": "user", "content": [{"type": "text", "text": "word " * 400}]},
            ],
        },
        surface=OPENAI,
    )
    assert long.prompt_tokens > short.prompt_tokens > 0  # type: ignore[attr-defined]
    assert long.prompt_tokens >= (9 * 50 + 5 * 400) // 4  # type: ignore[attr-defined]


def test_go_fold_matches_go_for_the_known_traps() -> None:
    """Long s folds to S and the Kelvin sign to K, as in Go's field matching."""
    assert go_fold("\u017ftream") == go_fold("stream") == "STREAM"
    assert go_fold("\u212aeep_alive") == go_fold("keep_alive")
    assert go_fold("straße") == "STRAßE"


@given(st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=6))
def test_arbitrary_objects_never_crash_the_reader(obj: dict[str, object]) -> None:
    """Any JSON object is either read or refused with BodyError, never another error."""
    with contextlib.suppress(BodyError):
        read_body(json.dumps(obj).encode(), surface=OLLAMA, kind=GEN)


def _reference_chars(value: object) -> int:
    # The estimate's definition, written plainly: UTF-8 bytes of text in strings, lists,
    # and the content/text/thinking fields of objects.
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, list):
        return sum(_reference_chars(item) for item in value)
    if isinstance(value, dict):
        fields = ("content", "text", "thinking", "reasoning")
        return sum(_reference_chars(value.get(k)) for k in fields)
    return 0


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["content", "text", "thinking", "role", "x"]), inner)
    ),
    max_leaves=20,
)


_MESSAGES = st.lists(
    st.dictionaries(
        st.sampled_from(["content", "text", "thinking", "reasoning", "role"]), _JSON_VALUES
    ),
    min_size=1,
    max_size=6,
)


@given(messages=_MESSAGES, prompt=_JSON_VALUES)
def test_prompt_estimate_counts_text_anywhere(messages: list[object], prompt: object) -> None:
    """The estimate counts every text the definition names, in any shape a client sends."""
    body = {"model": "m", "messages": messages, "prompt": prompt}
    chars = _reference_chars(messages) + _reference_chars(prompt)
    expected = -(-chars // 3) + 4 * len(messages)
    assert facts(body).prompt_tokens == expected  # type: ignore[attr-defined]


def test_prompt_estimate_ignores_padding_and_counts_what_ollama_tokenises() -> None:
    """Unknown fields and JSON whitespace cost nothing; context ids, images and tools count."""
    base = {"model": "m", "prompt": "Tell me about rivers."}
    plain = facts(base).prompt_tokens  # type: ignore[attr-defined]
    padded = json.dumps({**base, "padding": "x" * 60_000}, indent=40).encode() + b" " * 100_000
    assert read_body(padded, surface=OLLAMA, kind=GEN).prompt_tokens == plain
    assert facts({**base, "context": list(range(500))}).prompt_tokens == plain + 500  # type: ignore[attr-defined]
    tools = [{"type": "function", "function": {"name": "weather", "description": "x" * 300}}]
    assert facts({**base, "tools": tools}).prompt_tokens > plain + 100  # type: ignore[attr-defined]
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert facts(chat).prompt_tokens == 1 + 4  # type: ignore[attr-defined]
    # A bare prompt is framed by the template too; an embedding input is not.
    assert plain == -(-len("Tell me about rivers.") // 3) + 4


@pytest.mark.parametrize("field", ["CONTEXT", "Images", "TOOLS", "Template"])
def test_case_variants_of_counted_fields_are_refused(field: str) -> None:
    """Go would read `CONTEXT` as `context`; a count that skipped it would under-reserve."""
    raw = json.dumps({"model": "m", "prompt": "x", field: []}).encode()
    with pytest.raises(BodyError, match="ambiguous key"):
        read_body(raw, surface=OLLAMA, kind=GEN)


def test_a_duplicate_deep_in_a_long_chat_is_refused() -> None:
    """Duplicate keys are found in any object, not only the first ones."""
    messages = [{"role": "user", "content": f"turn {i}"} for i in range(300)]
    raw = json.dumps({"model": "m", "messages": messages}).encode()
    assert read_body(raw, surface=OLLAMA, kind=GEN).prompt_tokens > 0
    broken = raw.replace(b'"content": "turn 250"', b'"content": "turn 250", "role": "x"')
    with pytest.raises(BodyError, match="duplicate key 'role'"):
        read_body(broken, surface=OLLAMA, kind=GEN)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "prompt": "plain"},
        {"model": "m", "prompt": "héllo ✓ 😀 \u2028", "x": "\ud800"},
        {"model": "m", "prompt": "x", "options": {"seed": 10**30}},
        {"model": "m", "prompt": 'ctl \x00\x1f " \\ </script>', "n": [1.5, -0.0, 1e300]},
    ],
)
def test_serialised_bodies_are_ascii_json_that_reads_back_the_same(body: dict[str, object]) -> None:
    """The body Ollama receives is ASCII JSON equal to what policyd parsed, whichever
    encoder wrote it."""
    text = serialise(body)
    assert text.isascii()
    assert json.loads(text) == body

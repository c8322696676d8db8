"""The stand-in's pure rules: tokenizer, replies, model names, settings, path cleaning."""

from __future__ import annotations

import math

import pytest

from compose.standin.models import Catalogue, canonical_name, namespace_of
from compose.standin.router import clean_path
from compose.standin.settings import StandinSettings
from compose.standin.textgen import embedding, reply_for
from compose.standin.tokenizer import count_tokens, render_chat, tokenize

SAMPLES = [
    "Hello, world! International cooperation.",
    "東京は日本の首都です。",
    "Привет, мир",
    "def f(x):\n    return x < 10 && y",
    "12345678 café 🚀",
    "",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_tokens_concatenate_back_to_the_text(text: str) -> None:
    """Tokens are substrings that rebuild the text exactly, and count_tokens counts them."""
    tokens = tokenize(text)
    assert "".join(tokens) == text
    assert count_tokens(text) == len(tokens)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello", 2),  # "Hell" "o": four letters a token
        (" world", 2),  # the leading space rides on the word
        ("東京", 2),  # one token per CJK character
        ("Привет", 3),  # two letters per token in other scripts
        ("1234567", 3),  # digits in groups of three
        ("a\n\n\nb", 3),  # a run of newlines is one token
    ],
)
def test_tokenizer_rule(text: str, expected: int) -> None:
    """The documented rule: ~4 Latin letters per token, more tokens per char for CJK."""
    assert count_tokens(text) == expected


def test_chat_rendering_adds_a_template() -> None:
    """A chat is rendered as `role: content` lines followed by the assistant cue."""
    assert render_chat([("system", "be brief"), ("user", "hi")]) == (
        "system: be brief\nuser: hi\nassistant:"
    )


def test_replies_are_pure_functions_of_model_and_prompt() -> None:
    """Same (model, prompt) gives the same reply; another prompt or model gives another."""
    first = reply_for("llama3.2:latest", "user: hi\nassistant:")
    assert first == reply_for("llama3.2:latest", "user: hi\nassistant:")
    assert first != reply_for("llama3.2:latest", "user: hello\nassistant:")
    assert first != reply_for("qwen2.5-coder:7b", "user: hi\nassistant:")
    assert "".join(first.tokens) == first.text
    assert 20 <= len(first.tokens) <= 400


def test_embeddings_are_deterministic_unit_vectors() -> None:
    """Embeddings have the model's size, unit length and depend only on (model, text)."""
    vector = embedding("all-minilm:latest", "hello", dims=384)
    assert len(vector) == 384
    assert math.isclose(math.fsum(v * v for v in vector), 1.0, abs_tol=1e-5)
    assert vector == embedding("all-minilm:latest", "hello", dims=384)
    assert vector != embedding("all-minilm:latest", "hello!", dims=384)


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("llama3.2", "llama3.2:latest"),
        ("LLAMA3.2", "llama3.2:latest"),
        (" llama3.2:latest ", "llama3.2:latest"),
        ("library/llama3.2", "llama3.2:latest"),
        ("registry.ollama.ai/library/llama3.2:latest", "llama3.2:latest"),
        ("someone/model:tag", "someone/model:tag"),
        ("", None),
        ("bad name", None),
        ("a/b/c/d", None),
    ],
)
def test_model_names_follow_ollama(name: str, canonical: str | None) -> None:
    """Names match case-insensitively with default host, namespace and tag `latest`."""
    assert canonical_name(name) == canonical


def test_catalogue_finds_default_models_and_namespaces() -> None:
    """The default catalogue has the three documented models; namespaces default to library."""
    catalogue = Catalogue.from_names(None)
    assert [card.name for card in catalogue.cards] == [
        "llama3.2:latest",
        "qwen2.5-coder:7b",
        "all-minilm:latest",
    ]
    assert catalogue.find("Qwen2.5-Coder:7B") is not None
    assert catalogue.find("qwen2.5-coder") is None  # tag `latest` is not `7b`
    assert namespace_of("llama3.2") == "library"
    assert namespace_of("someone/model") == "someone"


def test_model_list_from_settings_synthesises_unknown_models() -> None:
    """NZ_STANDIN_MODELS names unknown models; embedding-like names become embedding-only."""
    catalogue = Catalogue.from_names(["llama3.2", "nomic-embed-text", "mistral:7b"])
    embed = catalogue.find("nomic-embed-text")
    mistral = catalogue.find("mistral:7b")
    assert embed is not None
    assert embed.capabilities == ("embedding",)
    assert mistral is not None
    assert mistral.supports("completion")


def test_settings_from_env_report_every_error() -> None:
    """Bad NZ_STANDIN_* values are all named in one error; defaults are 40/s and 150 ms."""
    assert StandinSettings.from_env({}) == StandinSettings(tokens_per_s=40.0, first_token_ms=150.0)
    with pytest.raises(ValueError, match=r"TOKENS_PER_S.*FIRST_TOKEN_MS"):
        StandinSettings.from_env(
            {"NZ_STANDIN_TOKENS_PER_S": "fast", "NZ_STANDIN_FIRST_TOKEN_MS": "-5"}
        )
    settings = StandinSettings.from_env(
        {"NZ_STANDIN_TOKENS_PER_S": "0", "NZ_STANDIN_MODELS": "a, b"}
    )
    assert settings.token_interval_s == 0.0
    assert settings.models == ("a", "b")


@pytest.mark.parametrize(
    ("path", "cleaned"),
    [
        ("/api/tags", "/api/tags"),
        ("//api/tags", "/api/tags"),
        ("/api/./tags", "/api/tags"),
        ("/api/x/../tags", "/api/tags"),
        ("/../api/tags/", "/api/tags/"),
    ],
)
def test_servemux_path_cleaning(path: str, cleaned: str) -> None:
    """Go's ServeMux cleaning: `//`, `.` and `..` go, a trailing slash stays."""
    assert clean_path(path) == cleaned

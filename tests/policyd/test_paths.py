"""Path allowlist: only canonical request-targets of known endpoints go upstream."""

from __future__ import annotations

import posixpath
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policyd.authz.paths import PathRefusal, classify_target, surface_of
from policyd.shared.contract import Surface

ALLOWED = [
    ("GET", "/api/version"),
    ("HEAD", "/api/version"),
    ("GET", "/api/tags"),
    ("HEAD", "/api/tags"),
    ("GET", "/api/ps"),
    ("POST", "/api/show"),
    ("POST", "/api/generate"),
    ("POST", "/api/chat"),
    ("POST", "/api/embed"),
    ("POST", "/api/embeddings"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/llama3.2:latest"),
    ("GET", "/v1/models/llama3.2%3Alatest"),
    ("GET", "/api/tags?verbose=1"),
]

MUTATIONS = [
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/copy",
    "/api/delete",
    "/api/blobs/sha256:abc",
    "/API/PULL",
    "/api/Pull",
    "/api/pull/",
    "/api//pull",
    "//api/pull",
    "/api/%70ull",
    "/api%2Fpull",
    "/api/pull%2F",
    "/api/pull/..",
    "/api\\pull",
]

NON_CANONICAL = [
    "/api/chat/",
    "/api//chat",
    "/api/./chat",
    "/api/x/../chat",
    "/api/%63hat",
    "/api/chat;x",
    "/api/chat%00",
    "/api/chat%3Fx",
    "/v1/models/..",
    "/v1/models/a%2Fb",
    "/v1/models/%2e%2e",
    "api/chat",
    "",
]


@pytest.mark.parametrize(("method", "target"), ALLOWED)
def test_allowlisted_endpoints_pass(method: str, target: str) -> None:
    """Every allowlisted endpoint with its own method is admitted."""
    verdict = classify_target(method, target)
    assert verdict.endpoint is not None, verdict


@pytest.mark.parametrize("target", MUTATIONS)
@pytest.mark.parametrize("method", ["POST", "GET", "DELETE", "HEAD"])
def test_mutation_endpoints_and_their_disguises_are_forbidden(method: str, target: str) -> None:
    """Model-management endpoints are refused however they are spelled."""
    verdict = classify_target(method, target)
    assert verdict.endpoint is None
    assert verdict.refusal in {PathRefusal.MUTATION, PathRefusal.NON_CANONICAL}


@pytest.mark.parametrize("target", NON_CANONICAL)
def test_non_canonical_targets_are_refused(target: str) -> None:
    """Nothing is normalised and then allowed."""
    verdict = classify_target("POST", target)
    assert verdict.endpoint is None
    assert verdict.refusal is PathRefusal.NON_CANONICAL


@pytest.mark.parametrize(
    "target",
    [
        "/",
        "/api/status",
        "/v1/responses",
        "/v1/messages",
        "/api/experimental/web_search",
        "/api/chat.",
    ],
)
def test_unknown_endpoints_are_refused(target: str) -> None:
    """Endpoints outside the allowlist never reach Ollama."""
    assert classify_target("POST", target).refusal is PathRefusal.UNKNOWN


def test_wrong_method_names_the_allowed_ones() -> None:
    """A known path with the wrong method is refused with the methods it takes."""
    verdict = classify_target("POST", "/api/tags")
    assert verdict.refusal is PathRefusal.METHOD
    assert verdict.allowed_methods == {"GET", "HEAD"}


def test_model_path_is_decoded_for_policy() -> None:
    """`/v1/models/{model}` hands the decoded model name to the policy."""
    verdict = classify_target("GET", "/v1/models/qwen2.5%3A7b")
    assert verdict.endpoint is not None
    assert verdict.endpoint.path_model == "qwen2.5:7b"


@pytest.mark.parametrize(
    ("target", "surface"),
    [
        ("/v1/chat/completions", Surface.OPENAI),
        ("//v1/x", Surface.OPENAI),
        ("/V1/models", Surface.OPENAI),
        ("/api/chat", Surface.OLLAMA),
        ("/", Surface.OLLAMA),
    ],
)
def test_surface_follows_the_path(target: str, surface: Surface) -> None:
    """Errors use the format of the API the caller addressed, even for refused paths."""
    assert surface_of(target) is surface


@given(st.text(alphabet="/.%2Fapiulchtv1;\\x", max_size=24))
def test_whatever_is_admitted_is_already_canonical(target: str) -> None:
    """Admitted paths equal their decoded, cleaned form: Ollama routes what we checked."""
    verdict = classify_target("POST", target)
    if verdict.endpoint is None or verdict.endpoint.path_model is not None:
        return
    path = target.split("?", 1)[0]
    assert unquote(path) == path
    assert posixpath.normpath(path) == path

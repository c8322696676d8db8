"""The host choice without I/O: names as Ollama folds them, affinity, the route cookies."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from policyd.authz.upstreams import (
    RouteKind,
    Upstream,
    UpstreamPool,
    model_ref,
    openai_model,
    parse_upstreams,
)


@pytest.mark.parametrize(
    ("name", "ref"),
    [
        ("llama3.2", "llama3.2:latest"),
        ("Llama3.2:LATEST", "llama3.2:latest"),
        ("library/llama3.2", "llama3.2:latest"),
        ("registry.ollama.ai/library/qwen:7b", "qwen:7b"),
        ("hf.co/org/model", "hf.co/org/model:latest"),
        ("host:5000/ns/model", "host:5000/ns/model:latest"),
        (":tag", ":tag:latest"),
    ],
)
def test_model_names_fold_as_ollama_matches_them(name: str, ref: str) -> None:
    assert model_ref(name) == ref


def _pool(hosts: dict[str, tuple[str, ...]], *, down: tuple[str, ...] = ()) -> UpstreamPool:
    upstreams, errors = parse_upstreams(" ".join(hosts))
    assert not errors
    # Never refreshed: the states are set here as a refresh would.
    pool = UpstreamPool(upstreams, http=None)  # type: ignore[arg-type]
    for state in pool.states:
        models = hosts[state.upstream.url]
        state.ok = state.upstream.url not in down
        state.models = frozenset(model_ref(m) for m in models)
        state.entries = tuple({"name": model_ref(m)} for m in models)
    pool.rebuild()
    return pool


def _cookie(dial: str) -> str:
    return hmac.new(b"", dial.encode(), hashlib.sha256).hexdigest()


def test_a_model_routes_to_its_hosts_first_and_second() -> None:
    """Only hosts with the model are named; with two, the second is the spill-over."""
    pool = _pool({"http://a:1": ("x", "both"), "http://b:2": ("y", "both"), "http://c:3": ()})
    assert pool.route("x").header == f"nz_upstream={_cookie('a:1')}"
    assert pool.route("Y:latest").header == f"nz_upstream={_cookie('b:2')}"
    both = pool.route("both").header
    assert both is not None
    assert sorted(part.split("=")[1] for part in both.split("; ")) == sorted(
        [_cookie("a:1"), _cookie("b:2")]
    )
    assert pool.route("nowhere").kind is RouteKind.MISSING


def test_affinity_is_stable_and_moves_only_the_lost_hosts_models() -> None:
    """Rendezvous order: dropping a host changes the first choice only where it was first."""
    models = tuple(f"m{n}" for n in range(200))
    hosts = {f"http://h{n}:1": models for n in range(4)}
    full = _pool(hosts)
    again = _pool(hosts)
    first = {m: full.route(m).header.split(";")[0] for m in models}  # type: ignore[union-attr]
    assert first == {m: again.route(m).header.split(";")[0] for m in models}  # type: ignore[union-attr]
    assert len(set(first.values())) == 4  # spread over every host
    lost = f"nz_upstream={_cookie('h0:1')}"
    fewer = _pool(hosts, down=("http://h0:1",))
    for model in models:
        now = fewer.route(model).header.split(";")[0]  # type: ignore[union-attr]
        assert now != lost
        if first[model] != lost:
            assert now == first[model]


def test_unknown_while_a_host_is_unheard_missing_only_when_all_answered() -> None:
    """A model only a silent host may have is not refused; Caddy decides."""
    pool = _pool({"http://a:1": ("x",), "http://b:2": ("y",)}, down=("http://b:2",))
    assert pool.route("y").kind is RouteKind.UNKNOWN
    assert pool.route("x").kind is RouteKind.ROUTED
    assert [e["name"] for e in pool.merged_tags()] == ["x:latest"]


def test_openai_model_shape() -> None:
    entry = {"name": "ns/model:7b", "modified_at": "2026-08-01T09:30:00.123456789Z"}
    assert openai_model(entry) == {
        "id": "ns/model:7b",
        "object": "model",
        "created": 1785576600,
        "owned_by": "ns",
    }
    assert openai_model({"name": "llama3.2:latest", "modified_at": "garbage"})["created"] == 0
    assert openai_model({"name": "llama3.2:latest"})["owned_by"] == "library"


def test_upstream_cookie_is_caddys_hmac() -> None:
    assert Upstream("http://a:1", "a:1").cookie == _cookie("a:1")

"""Prometheus metrics through the real stack: they move, and only internal listeners serve them."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from compose.local.parts import Stack
from compose.local.services import PolicydServer, Service
from policyd.shared.keys import generate_key
from tests.compose.test_metrics_profile import dashboard_metric_names
from tests.e2e.conftest import make_key
from tests.e2e.wire import raw_request

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

CHAT = {
    "model": "llama3.2",
    "messages": [{"role": "user", "content": "Tell me about rivers."}],
}


def scrape(url: str) -> Samples:
    """Every sample of one exposition, by name and label set."""
    reply = httpx.get(url, timeout=10)
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value; 0 when the series does not exist yet."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str) -> float:
    """The sum over every series of `name`."""
    return sum(v for (n, _), v in samples.items() if n == name)


def wait_for(url: str, check: Callable[[Samples], bool], *, timeout: float = 20.0) -> Samples:
    """Scrape until `check` holds (meterd settles asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def test_refusal_admission_and_stream_move_every_metric(stack: Stack, gateway: str) -> None:
    """A refusal, a fresh key's admission and a settled stream each move their counters."""
    urls = stack.metrics_urls
    key = make_key(stack, name="metrics")
    policyd0, meterd0, caddy0 = (
        scrape(urls["policyd"]),
        scrape(urls["meterd"]),
        scrape(urls["caddy"]),
    )

    refused = httpx.post(f"{gateway}/api/chat", json=CHAT, timeout=10)
    assert refused.status_code == 401
    wrong = httpx.post(
        f"{gateway}/v1/chat/completions",
        json=CHAT,
        # Well-formed, never stored: an unknown prefix, refused without Argon2.
        headers={"Authorization": f"Bearer {generate_key().full}"},
        timeout=10,
    )
    assert wrong.status_code == 401
    auth = {"Authorization": f"Bearer {key}"}
    streamed = httpx.post(
        f"{gateway}/api/chat", json={**CHAT, "stream": True}, headers=auth, timeout=30
    )
    assert streamed.status_code == 200
    again = httpx.post(
        f"{gateway}/api/chat", json={**CHAT, "stream": False}, headers=auth, timeout=30
    )
    assert again.status_code == 200

    policyd = scrape(urls["policyd"])
    decisions = "nz_policyd_decisions_total"
    assert value(
        policyd, decisions, outcome="refused", code="missing_api_key", surface="ollama"
    ) == (
        value(policyd0, decisions, outcome="refused", code="missing_api_key", surface="ollama") + 1
    )
    assert value(
        policyd, decisions, outcome="refused", code="invalid_api_key", surface="openai"
    ) == (
        value(policyd0, decisions, outcome="refused", code="invalid_api_key", surface="openai") + 1
    )
    assert value(policyd, decisions, outcome="admitted", code="ok", surface="ollama") == (
        value(policyd0, decisions, outcome="admitted", code="ok", surface="ollama") + 2
    )
    count = "nz_policyd_decision_seconds_count"
    assert value(policyd, count) == value(policyd0, count) + 4
    assert value(policyd, "nz_policyd_decision_seconds_sum") > value(
        policyd0, "nz_policyd_decision_seconds_sum"
    )
    # The fresh key: one Argon2 run; the second request is served from a cache (the
    # process's for 0.5 s, else Redis's) and every process miss is a Redis lookup.
    runs = "nz_policyd_argon2_runs_total"
    assert value(policyd, runs) == value(policyd0, runs) + 1
    cache = "nz_policyd_key_cache_total"

    def lookups(samples: Samples, result: str) -> float:
        return sum(value(samples, cache, cache=c, result=result) for c in ("process", "redis"))

    assert lookups(policyd, "hit") > lookups(policyd0, "hit")
    assert value(policyd, cache, cache="redis", result="miss") > value(
        policyd0, cache, cache="redis", result="miss"
    )

    # meterd settles the four lines: the stream estimated, the other exact.
    def settled(samples: Samples) -> bool:
        return value(samples, "nz_meterd_lines_total", result="settled") >= (
            value(meterd0, "nz_meterd_lines_total", result="settled") + 4
        ) and value(samples, "nz_meterd_tokens_total", kind="completion", usage_source="exact") > (
            value(meterd0, "nz_meterd_tokens_total", kind="completion", usage_source="exact")
        )

    meterd = wait_for(urls["meterd"], settled)
    assert settled(meterd), meterd
    tokens = "nz_meterd_tokens_total"
    for kind in ("prompt", "completion"):
        assert value(meterd, tokens, kind=kind, usage_source="estimated") > value(
            meterd0, tokens, kind=kind, usage_source="estimated"
        )
    tenant_tokens = "nz_meterd_tenant_tokens_total"
    assert total(meterd, tenant_tokens) > total(meterd0, tenant_tokens)
    assert value(meterd, "nz_meterd_lag_seconds") >= 0
    assert ("nz_meterd_store_retrying", frozenset()) in meterd

    caddy = scrape(urls["caddy"])
    requests = "caddy_http_requests_total"
    assert total(caddy, requests) >= total(caddy0, requests) + 4
    assert total(caddy, "caddy_http_request_duration_seconds_count") > total(
        caddy0, "caddy_http_request_duration_seconds_count"
    )


def test_redis_outage_counts_as_store_error(stack: Stack, gateway: str) -> None:
    """Redis down: the 503 is counted as a refusal and as a Redis outage."""
    key = make_key(stack, name="metrics-outage")
    url = stack.metrics_urls["policyd"]
    before = scrape(url)
    stack.redis.stop()
    try:
        reply = httpx.post(
            f"{gateway}/api/chat",
            json=CHAT,
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert reply.status_code == 503
    finally:
        stack.redis.start()
    after = scrape(url)
    errors = "nz_policyd_store_errors_total"
    assert value(after, errors, store="redis", kind="unavailable") == (
        value(before, errors, store="redis", kind="unavailable") + 1
    )
    decisions = "nz_policyd_decisions_total"
    labels = {"outcome": "refused", "code": "service_unavailable", "surface": "ollama"}
    assert value(after, decisions, **labels) == value(before, decisions, **labels) + 1


@pytest.mark.parametrize(
    "target",
    [
        "/metrics",
        "/metrics/policyd",
        "/Metrics",
        "//metrics",
        "/metrics/",
        "/metrics?format=prometheus",
        "/%6detrics",
        "/./metrics",
        "/statsz",
        "/api/../metrics",
    ],
)
def test_public_port_never_serves_metrics(stack: Stack, gateway: str, target: str) -> None:
    """No spelling of /metrics through the public port reaches any exposition, key or not."""
    key = make_key(stack, name="metrics-public")
    for headers in (
        {},
        {"Authorization": f"Bearer {key}"},
        # A Host naming the internal listener changes nothing: it is another socket.
        {"Authorization": f"Bearer {key}", "X-Forwarded-Uri": "/metrics"},
    ):
        reply = raw_request(gateway, "GET", target, headers=headers)
        assert reply.status != 200, (target, headers)
        assert b"nz_policyd" not in reply.body
        assert b"caddy_http" not in reply.body
        assert b"# HELP" not in reply.body
    absolute = raw_request(gateway, "GET", f"http://127.0.0.1:{stack.config.metrics_port}/metrics")
    assert absolute.status != 200
    assert b"# HELP" not in absolute.body


def test_internal_listener_serves_only_metrics(stack: Stack) -> None:
    """The metrics listener is loopback-only and routes nothing but the two expositions."""
    base = f"http://127.0.0.1:{stack.config.metrics_port}"
    for path in ("/authz", "/api/chat", "/healthz", "/statsz", "/metrics/meterd", "/"):
        assert httpx.get(f"{base}{path}", timeout=5).status_code == 404, path
    assert b"nz_policyd_decisions" in httpx.get(f"{base}/metrics/policyd", timeout=5).content


def _unix_get(socket_path: Path, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """One GET over policyd's socket on a new connection (so workers take turns)."""
    lines = [f"GET {target} HTTP/1.1", "Host: policyd", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(socket_path))
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_several_workers_report_one_sum(stack: Stack, tmp_path: Path) -> None:
    """Two Granian workers: /metrics from either sums both (multiprocess mode)."""
    server = Service(
        PolicydServer(
            socket_path=tmp_path / "p.sock",
            log_dir=tmp_path,
            settings={k: v for k, v in stack.env.items() if k.startswith("NZ_")},
            workers=2,
        )
    )
    server.start()
    try:
        forwarded = {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/api/tags"}
        for _ in range(20):
            status, _ = _unix_get(server.launcher.socket_path, "/authz", forwarded)
            assert status == 401
        for _ in range(6):
            status, body = _unix_get(server.launcher.socket_path, "/metrics", {})
            assert status == 200
            samples = {
                (s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(body.decode())
                for s in family.samples
            }
            labels = {"outcome": "refused", "code": "missing_api_key", "surface": "ollama"}
            assert value(samples, "nz_policyd_decisions_total", **labels) == 20
            assert value(samples, "nz_policyd_decision_seconds_count") == 20
        # One file per worker process: both loaded the metrics, and the sums above hold.
        assert len(list((tmp_path / "policyd-metrics").glob("counter_*.db"))) == 2
    finally:
        server.stop()


def test_dashboard_queries_name_metrics_the_stack_exports(stack: Stack, gateway: str) -> None:
    """Every metric the Grafana dashboard queries exists in a live scrape of the three parts."""
    key = make_key(stack, name="metrics-dashboard")
    reply = httpx.post(
        f"{gateway}/api/chat", json=CHAT, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    assert reply.status_code == 200
    exported: set[str] = set()
    for url in stack.metrics_urls.values():
        text = httpx.get(url, timeout=10).text
        for family in text_string_to_metric_families(text):
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
            exported |= {family.name + s for s in suffixes.get(family.type, ("",))}
            exported |= {sample.name for sample in family.samples}
    used = dashboard_metric_names()
    assert used <= exported, used - exported

"""Several Ollama hosts behind one gateway, through the real Caddy and two stand-ins.

Host 1 serves `alpha` and `shared`, host 2 `beta` and `shared`. What each host received
is read from its own request log; which host served a request also from the audit.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from compose.local.cli_runner import run_cli, run_cli_json
from compose.local.parts import Stack, StackConfig
from compose.local.services import PostgresServer, RedisServer, Service
from policyd.authz.upstreams import model_ref
from tests.e2e.conftest import StandinLog, make_key
from tests.e2e.test_metering import audit_rows

_MODELS = (("alpha", "shared"), ("beta", "shared"))


@pytest.fixture(scope="module")
def pool(
    run_dir: Path,
    postgres: Service[PostgresServer],
    database_url: str,
    redis_server: Service[RedisServer],
) -> Iterator[Stack]:
    """A gateway in front of two stand-ins (streams of a few seconds), own Caddy and meterd.

    A host with one request in flight counts as saturated, so spill-over is visible.
    """
    built = Stack(
        StackConfig(
            base_dir=run_dir / "pool-stack",
            standins=2,
            standin_models=_MODELS,
            standin_tokens_per_s=20,
            policyd_extra={"NZ_UPSTREAM_REFRESH_S": "0.5"},
            caddy_extra={
                "NZ_UPSTREAM_MAX_REQUESTS": "1",
                "NZ_UPSTREAM_HEALTH_INTERVAL": "500ms",
                "NZ_UPSTREAM_FAIL_DURATION": "2s",
            },
            meterd_node="pool",
        ),
        postgres=postgres,
        redis=redis_server,
    )
    with built:
        _wait_for_hosts(built, healthy=2)
        yield built


@pytest.fixture
def hosts(pool: Stack) -> list[StandinLog]:
    """Each stand-in's request log, emptied; stopped stand-ins are started again first."""
    for service in pool.standins:
        service.start()
    _wait_for_hosts(pool, healthy=2)
    logs = [StandinLog(service.launcher.url) for service in pool.standins]
    for log in logs:
        log.clear()
    return logs


@pytest.fixture
def key(pool: Stack) -> str:
    """A fresh key (the database is emptied before every test)."""
    return make_key(pool, tenant="pool", name="pool")


def _readyz(stack: Stack) -> httpx.Response:
    return httpx.get(f"{stack.gateway_url}/readyz", timeout=10)


def _wait_for_hosts(stack: Stack, *, healthy: int, timeout: float = 30.0) -> dict[str, str]:
    """Until /readyz reports `healthy` hosts ok, and long enough for Caddy's checks to agree."""
    deadline = time.monotonic() + timeout
    while True:
        hosts: dict[str, str] = _readyz(stack).json().get("upstreams", {})
        if sum(state == "ok" for state in hosts.values()) == healthy:
            # policyd's listing refresh and Caddy's active check run every 0.5 s here.
            time.sleep(1.5)
            return hosts
        assert time.monotonic() < deadline, hosts
        time.sleep(0.2)


def _show(stack: Stack, key: str, model: str, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{stack.gateway_url}/api/show",
        json={"model": model},
        headers={"Authorization": f"Bearer {key}", **headers},
        timeout=30,
    )


def _served(logs: list[StandinLog], path: str = "/api/show") -> list[int]:
    return [sum(r["raw_path"] == path for r in log.requests()) for log in logs]


def test_a_model_goes_only_to_the_hosts_that_have_it(
    pool: Stack, hosts: list[StandinLog], key: str
) -> None:
    """alpha only ever reaches host 1, beta host 2; the audit names the host of each."""
    ids = []
    for _ in range(4):
        for model in ("alpha", "beta", "ALPHA:latest"):
            reply = _show(pool, key, model)
            assert reply.status_code == 200, reply.text
            ids.append((reply.headers["x-request-id"], model))
    assert _served(hosts) == [8, 4]
    rows = audit_rows(pool, [request_id for request_id, _ in ids])
    dials = [service.launcher.url.removeprefix("http://") for service in pool.standins]
    for request_id, model in ids:
        expected = dials[0] if model_ref(model) == "alpha:latest" else dials[1]
        assert rows[request_id]["upstream"] == expected, rows[request_id]
    # The operator sees the same in `audit --json`.
    listed = run_cli_json("audit", "--limit", "20", env=pool.env)
    assert {row["request_id"]: row["upstream"] for row in listed} == {
        request_id: rows[request_id]["upstream"] for request_id, _ in ids
    }


def test_the_same_model_keeps_landing_on_the_same_host(
    pool: Stack, hosts: list[StandinLog], key: str
) -> None:
    """Affinity: every request for `shared` (both hosts have it) lands on one host."""
    for _ in range(10):
        assert _show(pool, key, "shared").status_code == 200
    assert sorted(_served(hosts)) == [0, 10]


def test_a_client_cookie_cannot_choose_the_host(
    pool: Stack, hosts: list[StandinLog], key: str
) -> None:
    """A forged route cookie (the exact value Caddy's policy looks for) is dropped."""
    host2 = pool.standins[1].launcher.url.removeprefix("http://")
    forged = hmac.new(b"", host2.encode(), hashlib.sha256).hexdigest()
    for cookie in (f"nz_upstream={forged}", f"nz_spill={forged}", "nz_listing=merged"):
        reply = _show(pool, key, "alpha", Cookie=cookie)
        assert reply.status_code == 200, reply.text
    assert _served(hosts) == [3, 0]
    for request in hosts[0].requests():
        assert "cookie" not in request["headers"]


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        (
            "/api/chat",
            {"model": "gamma", "messages": [{"role": "user", "content": "hi"}]},
            {"error": "model 'gamma' not found"},
        ),
        ("/api/show", {"model": "alpha:7b"}, {"error": "model 'alpha:7b' not found"}),
        (
            "/v1/chat/completions",
            {"model": "gamma", "messages": [{"role": "user", "content": "hi"}]},
            {
                "error": {
                    "message": "model 'gamma' not found",
                    "type": "not_found_error",
                    "param": None,
                    "code": "model_not_found",
                }
            },
        ),
    ],
)
def test_a_model_on_no_host_is_a_404_in_the_callers_format(
    pool: Stack,
    hosts: list[StandinLog],
    key: str,
    path: str,
    body: dict[str, object],
    expected: dict[str, object],
) -> None:
    """Refused before admission: no host sees it."""
    reply = httpx.post(
        f"{pool.gateway_url}{path}",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert reply.status_code == 404
    assert reply.json() == expected
    assert _served(hosts, path) == [0, 0]


def test_a_model_on_no_host_is_not_revealed_without_a_key(
    pool: Stack, hosts: list[StandinLog]
) -> None:
    """Whether a model exists is for key holders: no key is a 401 whatever the model."""
    reply = httpx.post(f"{pool.gateway_url}/api/show", json={"model": "gamma"}, timeout=30)
    assert reply.status_code == 401


def test_listings_merge_every_hosts_models(pool: Stack, hosts: list[StandinLog], key: str) -> None:
    """/api/tags and /v1/models list each model once, from every host, without asking one."""
    auth = {"Authorization": f"Bearer {key}"}
    tags = httpx.get(f"{pool.gateway_url}/api/tags", headers=auth, timeout=30)
    assert tags.status_code == 200, tags.text
    # Host order, each host's own order within: as one Ollama would list them.
    assert [m["name"] for m in tags.json()["models"]] == [
        "alpha:latest",
        "shared:latest",
        "beta:latest",
    ]
    models = httpx.get(f"{pool.gateway_url}/v1/models", headers=auth, timeout=30).json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [
        ("alpha:latest", "model", "library"),
        ("shared:latest", "model", "library"),
        ("beta:latest", "model", "library"),
    ]
    assert all(isinstance(m["created"], int) and m["created"] > 0 for m in models["data"])
    # No key, no listing.
    assert httpx.get(f"{pool.gateway_url}/api/tags", timeout=30).status_code == 401


def test_merged_listings_are_scoped_to_the_keys_models(
    pool: Stack, hosts: list[StandinLog], key: str
) -> None:
    """A key allowed `beta` and `shared` sees just those over both hosts, in every listing
    (official clients), /api/ps included once the models ran."""
    for model in ("alpha", "beta", "shared"):
        generate = {"model": model, "prompt": "x", "stream": False, "options": {"num_predict": 1}}
        reply = httpx.post(
            f"{pool.gateway_url}/api/generate",
            json=generate,
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
    scoped = make_key(pool, tenant="pool", name="scoped")
    run_cli("set-limits", "--key", scoped[:11], "--models", "beta,shared", env=pool.env)
    auth = {"Authorization": f"Bearer {scoped}"}
    with ollama.Client(host=pool.gateway_url, headers=auth) as client:
        assert [m.model for m in client.list().models] == ["shared:latest", "beta:latest"]
        assert sorted(m.model for m in client.ps().models) == ["beta:latest", "shared:latest"]
    with openai.OpenAI(base_url=f"{pool.gateway_url}/v1", api_key=scoped, max_retries=0) as oai:
        assert [m.id for m in oai.models.list()] == ["shared:latest", "beta:latest"]
    # Refused before any host is asked: not allowed (403) is not "not found" (404).
    assert _show(pool, scoped, "alpha").status_code == 403


def test_a_saturated_host_spills_over_to_the_next_that_has_the_model(
    pool: Stack, hosts: list[StandinLog], key: str
) -> None:
    """A stream in flight fills `shared`'s host (NZ_UPSTREAM_MAX_REQUESTS=1); the next
    request for it goes to the other host that has it."""
    body = {"model": "shared", "prompt": "Tell me a long story.", "stream": True}
    headers = {"Authorization": f"Bearer {key}"}
    readers = []  # an abandoned line iterator would close its stream
    with contextlib.ExitStack() as streams:
        for _ in range(1):
            stream = streams.enter_context(
                httpx.stream(
                    "POST",
                    f"{pool.gateway_url}/api/generate",
                    json=body,
                    headers=headers,
                    timeout=30,
                )
            )
            readers.append(stream.iter_lines())
            assert "response" in next(readers[-1])
        generated = _served(hosts, "/api/generate")
        assert sorted(generated) == [0, 1], generated
        busy = generated.index(1)
        assert _show(pool, key, "shared").status_code == 200
        spilled = _served(hosts)
        assert (spilled[busy], spilled[1 - busy]) == (0, 1)
    # The stream is gone: affinity is back.
    time.sleep(0.5)
    assert _show(pool, key, "shared").status_code == 200
    assert _served(hosts)[busy] == 1


def test_a_dead_host_stops_getting_requests_and_readyz_reports_it(
    pool: Stack, hosts: list[StandinLog], key: str
) -> None:
    """Host 2 stopped: `shared` moves to host 1 without an error; /readyz stays ready."""
    for _ in range(3):
        assert _show(pool, key, "shared").status_code == 200
    home = _served(hosts).index(3)
    other = 1 - home
    pool.standins[home].stop()
    # Connection refused by the stopped host: Caddy retries on the other one at once.
    for _ in range(6):
        reply = _show(pool, key, "shared")
        assert reply.status_code == 200, reply.text
    assert _served(hosts[other : other + 1]) == [6]
    hosts_state = _wait_for_hosts(pool, healthy=1)
    ready = _readyz(pool)
    assert ready.status_code == 200
    dead_url = pool.standins[home].launcher.url
    assert hosts_state[dead_url].startswith("down"), hosts_state
    # The dead host's only model is gone from the listing and is now a 404.
    only_there = "alpha" if home == 0 else "beta"
    assert _show(pool, key, only_there).status_code == 404
    # Every host down: not ready.
    pool.standins[other].stop()
    deadline = time.monotonic() + 20
    while _readyz(pool).status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    body = _readyz(pool).json()
    assert "ollama" in body["down"]
    assert all(state != "ok" for state in body["upstreams"].values())


def test_a_stream_on_a_host_that_dies_ends_with_an_error(
    pool: Stack, hosts: list[StandinLog], key: str
) -> None:
    """The host is killed mid-stream: the client's read fails promptly, it never hangs."""
    body = {"model": "alpha", "prompt": "Tell me a long story.", "stream": True}
    headers = {"Authorization": f"Bearer {key}"}
    failed = threading.Event()
    with httpx.stream(
        "POST",
        f"{pool.gateway_url}/api/generate",
        json=body,
        headers=headers,
        timeout=httpx.Timeout(30, read=20),
    ) as stream:
        lines = stream.iter_lines()
        assert "response" in next(lines)
        # The whole process family: the stand-in's worker holds the stream, not its leader.
        for pid in pool.standins[0].handle.family():
            os.kill(pid, signal.SIGKILL)
        try:
            for line in lines:
                assert '"done":true' not in line.replace(" ", "")
        except httpx.HTTPError:
            failed.set()
    assert failed.is_set(), "the stream ended as if complete"
    pool.standins[0].stop()

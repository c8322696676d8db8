"""Two complete gateway nodes (Caddy, policyd, meterd each, own access log) sharing one
Redis and one Postgres, in front of one slow stand-in: limits hold across the nodes,
each request is audited once by the node that served it, and a node lost mid-load
costs the other nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import create_async_engine

from compose.local.parts import Stack, StackConfig
from compose.local.services import PostgresServer, RedisServer, Service, StandinServer
from policyd.admin import accounts as admin
from tests.e2e.conftest import make_key
from tests.e2e.test_admission import _wait_for_free_slots, set_limits
from tests.e2e.test_metering import audit_rows

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
NODES = ("node-a", "node-b")


@pytest.fixture(scope="module")
def shared_standin(run_dir: Path) -> Iterator[Service[StandinServer]]:
    """One stand-in at a human pace (streams stay open for seconds) behind both nodes."""
    service = Service(
        StandinServer(
            log_dir=run_dir / "two-nodes", tokens_per_s=20, first_token_ms=20, name="standin-2n"
        )
    )
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def nodes(
    run_dir: Path,
    postgres: Service[PostgresServer],
    database_url: str,
    redis_server: Service[RedisServer],
    shared_standin: Service[StandinServer],
) -> Iterator[list[Stack]]:
    built = [
        Stack(
            StackConfig(
                base_dir=run_dir / name,
                standin_tokens_per_s=20,
                # Both nodes keep the default HMAC secret: every node of one gateway must
                # share it (keys are verified against it).
                meterd_node=name,
            ),
            postgres=postgres,
            redis=redis_server,
            standin=shared_standin,
        )
        for name in NODES
    ]
    try:
        for stack in built:
            stack.start()
        yield built
    finally:
        for stack in built:
            stack.stop()


@pytest.fixture
def running(nodes: list[Stack]) -> list[Stack]:
    """Both nodes up (a test may have killed one)."""
    for stack in nodes:
        stack.ensure_running()
    return nodes


def _chat(gateway: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{gateway}/api/chat",
        json={**CHAT, "options": {"num_predict": 2}},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def test_rpm_is_exact_across_nodes(running: list[Stack]) -> None:
    """RPM 6 and 16 requests over two nodes at once: exactly 6 admitted, whichever node."""
    key = make_key(running[0], tenant="two-nodes", name="rpm")
    set_limits(running[0], key=key[:11], rpm=6)

    async def fire() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            replies = await asyncio.gather(
                *(
                    client.post(
                        f"{running[n % 2].gateway_url}/api/chat",
                        json={**CHAT, "options": {"num_predict": 2}},
                        headers={"Authorization": f"Bearer {key}"},
                    )
                    for n in range(16)
                )
            )
        return [reply.status_code for reply in replies]

    statuses = asyncio.run(fire())
    assert sorted(statuses) == [200] * 6 + [429] * 10


def test_concurrency_is_exact_across_nodes(running: list[Stack]) -> None:
    """Concurrency 3 and 10 streams at once over both nodes: exactly 3 stream."""
    key = make_key(running[0], tenant="two-nodes", name="concurrency")
    set_limits(running[0], key=key[:11], concurrency=3)
    body = {**CHAT, "stream": True, "options": {"num_predict": 100}}  # ~5 s each
    count = 10
    answered = asyncio.Event()
    statuses: list[int] = []

    async def one(client: httpx.AsyncClient, gateway: str) -> None:
        async with client.stream("POST", f"{gateway}/api/chat", json=body) as reply:
            statuses.append(reply.status_code)
            if len(statuses) == count:
                answered.set()
            await answered.wait()

    async def hold() -> None:
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(headers=headers, timeout=60, limits=limits) as client:
            await asyncio.wait_for(
                asyncio.gather(*(one(client, running[n % 2].gateway_url) for n in range(count))),
                60,
            )

    asyncio.run(hold())
    assert sorted(statuses) == [200] * 3 + [429] * 7
    _wait_for_free_slots(running[0], key[:11], timeout=30)


def test_each_request_is_audited_once_by_the_node_that_served_it(running: list[Stack]) -> None:
    """Both meterds write to one audit table: one row per request, the right node on it."""
    key = make_key(running[0], tenant="two-nodes", name="audit")
    sent: list[tuple[str, str]] = []
    for n in range(8):
        reply = _chat(running[n % 2].gateway_url, key)
        assert reply.status_code == 200
        sent.append((reply.headers["x-request-id"], NODES[n % 2]))
    rows = audit_rows(running[0], [request_id for request_id, _ in sent])
    assert {request_id: rows[request_id]["node"] for request_id, _ in sent} == dict(sent)


def test_a_revoked_key_is_refused_on_both_nodes_within_a_second(running: list[Stack]) -> None:
    """Each node's policyd trusts a verified key for 0.5 s at most; after 1 s both refuse."""
    key = make_key(running[0], tenant="two-nodes", name="revoked")
    for stack in running:
        assert _chat(stack.gateway_url, key).status_code == 200

    async def revoke() -> None:
        engine = create_async_engine(running[0].database_url)
        redis = aioredis.Redis.from_url(running[0].redis_url)
        try:
            await admin.revoke_key(engine, redis, prefix=key[:11])
        finally:
            await redis.aclose()
            await engine.dispose()

    asyncio.run(revoke())
    time.sleep(1.0)
    for stack in running:
        reply = _chat(stack.gateway_url, key)
        assert reply.status_code == 401, reply.text
        assert reply.headers["x-nz-refusal"] == "revoked_api_key"


def test_a_node_killed_mid_load_loses_no_audit_rows_of_the_other(running: list[Stack]) -> None:
    """Node A's Caddy, policyd and meterd are killed while both nodes serve; every request
    node B answered is audited, once, by node B."""
    key = make_key(running[0], tenant="two-nodes", name="kill")
    node_a, node_b = running
    stop = threading.Event()
    answered: dict[str, list[str]] = {name: [] for name in NODES}

    def load(stack: Stack, name: str) -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                try:
                    reply = client.post(
                        f"{stack.gateway_url}/api/chat",
                        json={**CHAT, "options": {"num_predict": 2}},
                        headers={"Authorization": f"Bearer {key}"},
                    )
                except httpx.HTTPError:
                    continue  # node A is gone
                answered[name].append(reply.headers["x-request-id"])

    workers = [
        threading.Thread(target=load, args=(stack, name))
        for stack, name in ((node_a, NODES[0]), (node_b, NODES[1]))
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    try:
        deadline = time.monotonic() + 60
        while min(len(ids) for ids in answered.values()) < 5:
            assert time.monotonic() < deadline, "no load on both nodes"
            time.sleep(0.1)
        for part in (node_a.caddy, node_a.policyd, node_a.meterd):
            for pid in part.handle.family():
                os.kill(pid, signal.SIGKILL)
        served_after = len(answered[NODES[1]])
        while len(answered[NODES[1]]) < served_after + 10:
            assert time.monotonic() < deadline + 60, "node B stopped serving"
            time.sleep(0.1)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    for part in (node_a.meterd, node_a.policyd, node_a.caddy):
        part.stop()  # reap; `running` starts them again for the next test
    ids_b = answered[NODES[1]]
    rows = audit_rows(node_b, ids_b, timeout=60)
    assert len(rows) == len(ids_b)
    assert {row["node"] for row in rows.values()} == {NODES[1]}

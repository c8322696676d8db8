"""Redis behind Sentinel: the primary is killed under load and the gateway follows.

Real processes: a primary and a replica redis-server, three Sentinels (quorum 2), and a
gateway (stand-in, policyd, Caddy, meterd) whose policyd and meterd know only the
Sentinels.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from compose.local.parts import Stack, StackConfig
from compose.local.services import PostgresServer, RedisServer, SentinelServer, Service
from tests.e2e.conftest import make_key
from tests.e2e.test_metering import audit_rows

_SERVICE = "nz"


class Cluster:
    """A primary, its replica and three Sentinels."""

    def __init__(self, base: Path) -> None:
        logs = base / "log"
        self.primary = Service(RedisServer(data_dir=base / "primary", log_dir=logs, name="redis"))
        port = self.primary.launcher.port
        self.replica = Service(
            RedisServer(data_dir=base / "replica", log_dir=logs, name="replica", replica_of=port)
        )
        self.sentinels = [
            Service(
                SentinelServer(
                    data_dir=base / f"sentinel{n}",
                    primary_port=port,
                    service=_SERVICE,
                    quorum=2,
                    log_dir=logs,
                    name=f"sentinel{n}",
                )
            )
            for n in range(3)
        ]

    @property
    def addresses(self) -> str:
        return " ".join(s.launcher.address for s in self.sentinels)

    def primary_port(self) -> int:
        """The port of the primary the first Sentinel names (even while it is down)."""
        client = redis.Redis(port=self.sentinels[0].launcher.port, socket_timeout=2)
        try:
            found: Any = client.sentinel_get_master_addr_by_name(_SERVICE)
        finally:
            client.close()
        host, port = found
        assert host in ("127.0.0.1", b"127.0.0.1"), found
        return int(port)

    def _all(self) -> list[Service[Any]]:
        return [self.primary, self.replica, *self.sentinels]

    def start(self) -> None:
        for service in self._all():
            service.start()
        deadline = time.monotonic() + 60
        while not self._settled():
            assert time.monotonic() < deadline, "the Sentinels never saw each other and the replica"
            time.sleep(0.3)

    def _settled(self) -> bool:
        replica = redis.Redis(port=self.replica.launcher.port, socket_timeout=2)
        try:
            info = replica.info("replication")
            if info.get("master_link_status") != "up":
                return False
        finally:
            replica.close()
        for service in self.sentinels:
            client = redis.Redis(port=service.launcher.port, socket_timeout=2)
            try:
                replicas: Any = client.sentinel_slaves(_SERVICE)
                others: Any = client.sentinel_sentinels(_SERVICE)
            finally:
                client.close()
            if len(replicas) != 1 or len(others) != 2:
                return False
        return True

    def stop(self) -> None:
        for service in reversed(self._all()):
            service.stop()


@pytest.fixture(scope="module")
def cluster(run_dir: Path) -> Iterator[Cluster]:
    built = Cluster(run_dir / "sentinel-cluster")
    try:
        built.start()
        yield built
    finally:
        built.stop()


@pytest.fixture(scope="module")
def sentinel_stack(
    run_dir: Path, postgres: Service[PostgresServer], database_url: str, cluster: Cluster
) -> Iterator[Stack]:
    """A gateway on the session Postgres whose Redis is found through the Sentinels only."""
    built = Stack(
        StackConfig(
            base_dir=run_dir / "sentinel-stack",
            store_extra={
                "NZ_REDIS_SENTINELS": cluster.addresses,
                "NZ_REDIS_SENTINEL_SERVICE": _SERVICE,
            },
            meterd_node="sentinel",
        ),
        postgres=postgres,
        redis=cluster.primary,
    )
    with built:
        yield built


class Load:
    """Workers sending small non-streamed chats until stopped, recording every answer."""

    def __init__(self, gateway: str, key: str, workers: int = 4) -> None:
        self._gateway = gateway
        self._key = key
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.answers: list[tuple[float, int, str, str]] = []  # (at, status, id, body)
        self._threads = [threading.Thread(target=self._work) for _ in range(workers)]

    def _work(self) -> None:
        body = {
            "model": "llama3.2",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": False,
            "options": {"num_predict": 4},
        }
        headers = {"Authorization": f"Bearer {self._key}"}
        with httpx.Client(base_url=self._gateway, timeout=30) as client:
            while not self._stop.is_set():
                reply = client.post("/api/chat", json=body, headers=headers)
                with self._lock:
                    self.answers.append(
                        (
                            time.monotonic(),
                            reply.status_code,
                            reply.headers.get("x-request-id", ""),
                            reply.text,
                        )
                    )

    def ok_since(self, moment: float) -> int:
        with self._lock:
            return sum(1 for at, status, _, _ in self.answers if at > moment and status == 200)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def _wait(condition: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


async def _ledger(stack: Stack, prefix: str) -> tuple[int, int]:
    engine = create_async_engine(stack.database_url)
    try:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.text(
                        "SELECT coalesce(sum(l.requests), 0), "
                        "coalesce(sum(l.prompt_tokens + l.completion_tokens), 0) "
                        "FROM usage_ledger l JOIN api_keys k ON k.id = l.key_id "
                        "WHERE k.prefix = :prefix"
                    ),
                    {"prefix": prefix},
                )
            ).one()
    finally:
        await engine.dispose()
    return int(row[0]), int(row[1])


def test_killing_the_primary_under_load_gives_only_503s_then_admissions_resume(
    cluster: Cluster, sentinel_stack: Stack
) -> None:
    """Only 200 or a fail-closed 503 while the Sentinels promote the replica; then 200s
    again, every request audited once and settled once, no reservation left behind."""
    stack = sentinel_stack
    key = make_key(stack, tenant="failover", name="failover")
    old_port = cluster.primary.launcher.port
    assert cluster.primary_port() == old_port
    with Load(stack.gateway_url, key) as load:
        _wait(lambda: load.ok_since(0) >= 10, "no admissions before the failover")
        killed_at = time.monotonic()
        for pid in cluster.primary.handle.family():
            os.kill(pid, signal.SIGKILL)
        _wait(lambda: cluster.primary_port() != old_port, "the Sentinels never failed over")
        _wait(lambda: load.ok_since(killed_at) >= 10, "admissions never resumed", timeout=90)
    cluster.primary.stop()  # reap it; it stays down (a replica-to-be in real life)
    assert cluster.primary_port() == cluster.replica.launcher.port

    statuses = {status for _, status, _, _ in load.answers}
    assert statuses <= {200, 503}, [(s, b) for _, s, _, b in load.answers if s not in (200, 503)]
    for _, status, _, body in load.answers:
        if status == 503:
            assert "try again shortly" in body
    ok = [request_id for _, status, request_id, _ in load.answers if status == 200]
    assert len(ok) >= 20

    # meterd followed too: every request audited once, usage counted once per request.
    rows = audit_rows(stack, [request_id for _, _, request_id, _ in load.answers], timeout=60)
    assert len(rows) == len(load.answers)
    assert sorted(r["status"] for r in rows.values()) == sorted(s for _, s, _, _ in load.answers)
    _wait(
        lambda: asyncio.run(_ledger(stack, key[:11]))[0] == len(ok),
        f"the ledger does not count the {len(ok)} admitted requests once each",
    )
    # No reservation is left for the sweeper to charge a second time.
    new_primary = redis.Redis(port=cluster.primary_port(), socket_timeout=5)
    try:
        _wait(
            lambda: not list(new_primary.scan_iter(match="nz:*:res:*", count=1000)),
            "reservations were left unsettled on the new primary",
        )
    finally:
        new_primary.close()

"""Bounded restarts through the real Caddy: no request outlives NZ_MAX_REQUEST_S (what
leases are sized by), and a stop waits at most NZ_GRACE_PERIOD for requests in flight."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import httpx
import redis

from compose.local.parts import Stack, StackConfig
from compose.local.services import PostgresServer, RedisServer, Service
from tests.e2e.conftest import make_key
from tests.e2e.test_admission import set_limits
from tests.e2e.test_metering import audit_rows

__all__: list[str] = []

_MAX_REQUEST_S: Final = 4
_GRACE_S: Final = 2
#: 20 tokens a second for 1,200 tokens: a minute, far beyond both bounds.
_LONG_STREAM: Final = {
    "model": "llama3.2",
    "messages": [{"role": "user", "content": "Tell me everything about rivers."}],
    "stream": True,
    "options": {"num_predict": 1200},
}


@contextlib.contextmanager
def _gateway(
    run_dir: Path,
    postgres: Service[PostgresServer],
    redis_server: Service[RedisServer],
    *,
    max_request_s: int = 600,
    lease_ttl_s: int | None = None,
) -> Iterator[Stack]:
    """A gateway with the given request time limit, a short grace period and a slow
    stand-in, on the session's Postgres and Redis."""
    built = Stack(
        StackConfig(
            base_dir=run_dir / f"bounded-{time.monotonic_ns()}",
            standin_tokens_per_s=20,
            caddy_extra={
                "NZ_MAX_REQUEST_S": str(max_request_s),
                "NZ_GRACE_PERIOD": f"{_GRACE_S}s",
            },
            policyd_extra={
                "NZ_MAX_REQUEST_S": str(max_request_s),
                **({"NZ_LEASE_TTL_S": str(lease_ttl_s)} if lease_ttl_s is not None else {}),
            },
        ),
        postgres=postgres,
        redis=redis_server,
    )
    with built:
        yield built


def _stream(gateway: str, key: str, received: list[bytes]) -> str:
    """Read a long stream until the gateway ends it; returns its request id."""
    with httpx.stream(
        "POST",
        f"{gateway}/api/chat",
        json=_LONG_STREAM,
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    ) as reply:
        try:
            for chunk in reply.iter_raw():
                received.append(chunk)
        except httpx.HTTPError:
            pass  # the connection was cut: that is the point
        return reply.headers["x-request-id"]


def test_no_response_outlives_the_request_time_limit(
    run_dir: Path,
    postgres: Service[PostgresServer],
    database_url: str,
    redis_server: Service[RedisServer],
) -> None:
    """A stream that would run a minute is cut at NZ_MAX_REQUEST_S (Caddy's write
    timeout), so no request outlives the concurrency lease sized by it; the cut request
    is settled from its line."""
    with _gateway(run_dir, postgres, redis_server, max_request_s=_MAX_REQUEST_S) as stack:
        _cut_at_the_limit(stack)


def _cut_at_the_limit(bounded_stack: Stack) -> None:
    key = make_key(bounded_stack, name="long")
    received: list[bytes] = []
    started = time.monotonic()
    request_id = _stream(bounded_stack.gateway_url, key, received)
    took = time.monotonic() - started
    assert received, "the stream never started"
    assert b'"done":true' not in b"".join(received)
    assert took < 30, f"the stream ran {took:.1f}s despite a {_MAX_REQUEST_S}s limit"
    row = audit_rows(bounded_stack, [request_id])[request_id]
    assert 0 < row["completion_tokens"] < 1200


def test_a_stop_waits_at_most_the_grace_period(
    run_dir: Path,
    postgres: Service[PostgresServer],
    database_url: str,
    redis_server: Service[RedisServer],
) -> None:
    """SIGTERM while a minute-long stream runs: Caddy closes it after the grace period
    instead of waiting for its end; the client sees its stream end without the final
    chunk, and its reservation stays charged for the sweep."""
    with _gateway(run_dir, postgres, redis_server) as stack:
        _stopped_within_grace(stack)


def _stopped_within_grace(bounded_stack: Stack) -> None:
    key = make_key(bounded_stack, name="grace")
    received: list[bytes] = []
    ids: list[str] = []
    reader = threading.Thread(
        target=lambda: ids.append(_stream(bounded_stack.gateway_url, key, received))
    )
    reader.start()
    deadline = time.monotonic() + 20
    while not received:
        assert time.monotonic() < deadline, "the stream never started"
        time.sleep(0.05)
    stopping = time.monotonic()
    bounded_stack.caddy.stop(timeout=45)  # SIGTERM; SIGKILL only after 45 s
    took = time.monotonic() - stopping
    reader.join(timeout=30)
    assert not reader.is_alive()
    assert b'"done":true' not in b"".join(received)
    # Without the grace period Caddy would wait the stream's minute (and be killed at 45 s).
    assert took < 30, f"stopping took {took:.1f}s with a {_GRACE_S}s grace period"
    # Caddy exits without a line for a request it cut: the reservation stays charged
    # (fail-closed) until meterd's sweep audits it, NZ_LEASE_TTL_S + the sweep grace later.
    request_id = ids[0]
    assert request_id.encode() not in bounded_stack.access_log.read_bytes()
    assert _reservation_held(bounded_stack, request_id)


def _reservation_held(stack: Stack, request_id: str) -> bool:
    client = redis.Redis.from_url(stack.redis_url)
    try:
        return bool(client.keys(f"nz:*:res:{request_id}"))
    finally:
        client.close()


def test_while_meterd_is_down_a_finished_request_holds_its_slot_at_most_its_lease(
    run_dir: Path,
    postgres: Service[PostgresServer],
    database_url: str,
    redis_server: Service[RedisServer],
) -> None:
    """meterd stopped: nothing releases a finished request's lease, so a key at its
    concurrency limit is refused, but only until the lease's TTL (sized by the request
    time limit); once meterd is back the refused and admitted requests are audited."""
    with _gateway(
        run_dir, postgres, redis_server, max_request_s=_MAX_REQUEST_S, lease_ttl_s=6
    ) as stack:
        key = make_key(stack, name="meterless")
        set_limits(stack, key=key[:11], concurrency=1)
        stack.meterd.stop()
        auth = {"Authorization": f"Bearer {key}"}
        body = {**_LONG_STREAM, "stream": False, "options": {"num_predict": 5}}
        with httpx.Client(base_url=stack.gateway_url, timeout=30) as client:
            first = client.post("/api/chat", json=body, headers=auth)
            admitted_at = time.monotonic()
            second = client.post("/api/chat", json=body, headers=auth)
            assert (first.status_code, second.status_code) == (200, 429)
            time.sleep(max(0.0, admitted_at + 7 - time.monotonic()))
            third = client.post("/api/chat", json=body, headers=auth)
        assert third.status_code == 200
        stack.meterd.start()
        ids = [r.headers["x-request-id"] for r in (first, second, third)]
        assert sorted(audit_rows(stack, ids)) == sorted(ids)

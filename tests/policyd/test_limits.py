"""Admission and settlement scripts against a real Redis."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyd.authz.limits import Limiter, effective_limits, next_day, next_month
from policyd.authz.records import KeyRecord, Limits
from policyd.authz.refusals import Reason
from policyd.shared.contract import (
    H_RATE_REQUESTS,
    H_RATE_TOKENS,
    load_script,
    release_script,
    settle_script,
)
from policyd.shared.errors import StoreFault, StoreUnavailable
from policyd.shared.keyspace import load_call, release_call, settle_call, tenant_base


class Clock:
    """A settable wall clock for window-boundary tests."""

    def __init__(self, at: dt.datetime) -> None:
        self.now = at.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def record(
    *,
    key: Limits | None = None,
    tenant: Limits | None = None,
    tenant_id: str | None = None,
    key_id: str | None = None,
) -> KeyRecord:
    return KeyRecord(
        key_id=key_id or uuid.uuid4().hex,
        prefix="nz_abcdefgh",
        tenant_id=tenant_id or uuid.uuid4().hex,
        tenant_name="acme",
        digest="d",
        expires_at=None,
        revoked=False,
        key_limits=key or Limits(),
        tenant_limits=tenant or Limits(),
    )


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def make_limiter(
    redis: aioredis.Redis, clock: Callable[[], float] | None = None, *, lease_ttl_s: float = 60
) -> Limiter:
    source = load_script()

    async def load_empty(rec: KeyRecord) -> None:
        await redis.eval(source, 1, f"{tenant_base(rec.tenant_id)}loaded", 0)

    if clock is None:
        return Limiter(redis=redis, load_tenant=load_empty, lease_ttl_s=lease_ttl_s, timeout_s=2)
    return Limiter(
        redis=redis, load_tenant=load_empty, lease_ttl_s=lease_ttl_s, timeout_s=2, clock=clock
    )


async def admitted(limiter: Limiter, rec: KeyRecord, n: int, reserve: int = 10) -> int:
    results = await asyncio.gather(
        *(limiter.admit(rec, request_id=uuid.uuid4().hex, reserve=reserve) for _ in range(n))
    )
    return sum(1 for r in results if r.refusal is None)


async def test_rpm_admits_exactly_the_limit_under_parallel_load(redis: aioredis.Redis) -> None:
    """K simultaneous requests against an RPM of N: exactly N pass."""
    rec = record(key=Limits(rpm=7))
    assert await admitted(make_limiter(redis), rec, 40) == 7


async def test_tenant_limit_caps_the_sum_over_its_keys(redis: aioredis.Redis) -> None:
    """Several keys share the tenant's RPM even when each key's own limit is higher."""
    tenant_id = uuid.uuid4().hex
    tenant = Limits(rpm=10)
    keys = [record(key=Limits(rpm=8), tenant=tenant, tenant_id=tenant_id) for _ in range(3)]
    limiter = make_limiter(redis)
    counts = await asyncio.gather(*(admitted(limiter, k, 8) for k in keys))
    assert sum(counts) == 10
    assert max(counts) <= 8


@pytest.mark.parametrize(
    ("key", "tenant", "expected"),
    [
        (Limits(), Limits(), 25),  # unlimited at both levels
        (Limits(rpm=5), Limits(), 5),  # key only
        (Limits(), Limits(rpm=6), 6),  # tenant default applies to the key
        (Limits(rpm=9), Limits(rpm=4), 4),  # tenant cap wins over a larger key value
        (Limits(rpm=3), Limits(rpm=20), 3),  # key override below the tenant default
    ],
)
async def test_inheritance_matrix(
    redis: aioredis.Redis, key: Limits, tenant: Limits, expected: int
) -> None:
    """Key values override tenant defaults for the key; tenant values cap the total."""
    assert await admitted(make_limiter(redis), record(key=key, tenant=tenant), 25) == expected


def test_effective_limits_pairs_key_and_tenant() -> None:
    """An unset key value inherits the tenant's; the tenant column is the tenant's own."""
    found = effective_limits(record(key=Limits(tpm=5), tenant=Limits(tpm=9, rpm=3)))
    assert found["tpm"] == (5, 9)
    assert found["rpm"] == (3, 3)
    assert found["concurrency"] == (None, None)


async def test_refusal_names_the_limit_and_consumes_nothing(redis: aioredis.Redis) -> None:
    """A request refused by one limit leaves every other counter untouched."""
    rec = record(key=Limits(concurrency=1, daily_tokens=1000), tenant=Limits(rpm=100))
    limiter = make_limiter(redis)
    assert (await limiter.admit(rec, request_id="a", reserve=100)).refusal is None
    before = await snapshot(redis, rec)
    refused = await limiter.admit(rec, request_id="b", reserve=100)
    assert refused.refusal is not None
    assert refused.refusal.reason is Reason.CONCURRENCY
    assert "concurrent-request limit of key nz_abcdefgh" in refused.refusal.message
    assert await snapshot(redis, rec) == before


async def snapshot(redis: aioredis.Redis, rec: KeyRecord) -> dict[bytes, object]:
    state: dict[bytes, object] = {}
    async for name in redis.scan_iter(f"{tenant_base(rec.tenant_id)}*"):
        kind = await redis.type(name)
        if kind == b"string":
            state[name] = await redis.get(name)
        elif kind == b"hash":
            state[name] = await redis.hgetall(name)
        elif kind == b"zset":
            state[name] = await redis.zrange(name, 0, -1, withscores=True)
    return state


async def test_budget_is_never_overbooked_by_concurrent_requests(redis: aioredis.Redis) -> None:
    """Against a nearly exhausted budget, reservations never exceed what is left."""
    rec = record(tenant=Limits(daily_tokens=1000))
    limiter = make_limiter(redis)
    assert (await limiter.admit(rec, request_id="big", reserve=900)).refusal is None
    assert await admitted(limiter, rec, 50, reserve=30) == 3
    day = dt.datetime.now(dt.UTC).strftime("%Y%m%d")
    used = int(await redis.get(f"{tenant_base(rec.tenant_id)}day:t:{day}") or 0)
    assert used == 990


async def test_daily_budget_resets_exactly_at_utc_midnight(redis: aioredis.Redis) -> None:
    """One second before midnight the budget is spent; at midnight it is whole again."""
    clock = Clock(dt.datetime(2026, 11, 26, 23, 59, 59, tzinfo=dt.UTC))
    rec = record(key=Limits(daily_tokens=100))
    limiter = make_limiter(redis, clock)
    assert (await limiter.admit(rec, request_id="1", reserve=100)).refusal is None
    refused = (await limiter.admit(rec, request_id="2", reserve=1)).refusal
    assert refused is not None
    assert refused.reason is Reason.DAILY_BUDGET
    assert "resets 2026-11-27T00:00:00Z" in refused.message
    assert ("retry-after", "2") in refused.headers
    clock.advance(1)
    assert (await limiter.admit(rec, request_id="3", reserve=100)).refusal is None


async def test_monthly_budget_resets_at_month_end(redis: aioredis.Redis) -> None:
    """The monthly window runs to the first of the next month, UTC; December rolls the year."""
    clock = Clock(dt.datetime(2026, 12, 31, 23, 59, 59, tzinfo=dt.UTC))
    rec = record(tenant=Limits(monthly_tokens=50))
    limiter = make_limiter(redis, clock)
    assert (await limiter.admit(rec, request_id="1", reserve=50)).refusal is None
    refused = (await limiter.admit(rec, request_id="2", reserve=1)).refusal
    assert refused is not None
    assert "tenant acme" in refused.message
    assert "resets 2027-01-01T00:00:00Z" in refused.message
    clock.advance(1)
    assert (await limiter.admit(rec, request_id="3", reserve=50)).refusal is None


async def test_total_budget_never_resets(redis: aioredis.Redis) -> None:
    """The total budget has no window: a year later it is still spent."""
    clock = Clock(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    rec = record(key=Limits(total_tokens=10))
    limiter = make_limiter(redis, clock)
    assert (await limiter.admit(rec, request_id="1", reserve=10)).refusal is None
    clock.advance(400 * 86400)
    refused = (await limiter.admit(rec, request_id="2", reserve=1)).refusal
    assert refused is not None
    assert refused.reason is Reason.TOTAL_BUDGET
    assert not any(name == "retry-after" for name, _ in refused.headers)


async def test_sliding_window_frees_requests_sixty_seconds_later(redis: aioredis.Redis) -> None:
    """RPM slots come back as their second leaves the 60-second window, not all at once."""
    clock = Clock(dt.datetime(2026, 11, 26, 12, 0, 0, tzinfo=dt.UTC))
    rec = record(key=Limits(rpm=2))
    limiter = make_limiter(redis, clock)
    assert (await limiter.admit(rec, request_id="a", reserve=0)).refusal is None
    clock.advance(30)
    assert (await limiter.admit(rec, request_id="b", reserve=0)).refusal is None
    refused = (await limiter.admit(rec, request_id="c", reserve=0)).refusal
    assert refused is not None
    assert ("retry-after", "30") in refused.headers
    clock.advance(29)
    assert (await limiter.admit(rec, request_id="d", reserve=0)).refusal is not None
    clock.advance(1)
    assert (await limiter.admit(rec, request_id="e", reserve=0)).refusal is None


async def test_expired_lease_gives_the_slot_back(redis: aioredis.Redis) -> None:
    """A lease whose settlement never came stops counting after its TTL."""
    clock = Clock(dt.datetime(2026, 11, 26, 12, 0, 0, tzinfo=dt.UTC))
    rec = record(key=Limits(concurrency=1))
    limiter = make_limiter(redis, clock, lease_ttl_s=5)
    assert (await limiter.admit(rec, request_id="a", reserve=0)).refusal is None
    assert (await limiter.admit(rec, request_id="b", reserve=0)).refusal is not None
    clock.advance(5.001)
    assert (await limiter.admit(rec, request_id="c", reserve=0)).refusal is None


async def test_admission_waits_briefly_for_a_lease_about_to_free(redis: aioredis.Redis) -> None:
    """A concurrency refusal is asked again for up to the wait: a lease released meanwhile
    (meterd reading the previous request's line) admits the request; none refuses it."""
    rec = record(key=Limits(concurrency=1))

    async def load_empty(rec: KeyRecord) -> None:
        await redis.eval(load_script(), 1, f"{tenant_base(rec.tenant_id)}loaded", 0)

    waiting = Limiter(
        redis=redis,
        load_tenant=load_empty,
        lease_ttl_s=60,
        timeout_s=2,
        concurrency_wait_s=5,
    )
    assert (await waiting.admit(rec, request_id="first", reserve=0)).refusal is None
    keys, args = release_call(tenant_id=rec.tenant_id, key_id=rec.key_id, request_id="first")

    async def release_soon() -> None:
        await asyncio.sleep(0.3)
        assert await redis.eval(release_script(), len(keys), *keys, *args) == 1

    releasing = asyncio.create_task(release_soon())
    assert (await waiting.admit(rec, request_id="second", reserve=0)).refusal is None
    await releasing
    # Nothing frees the slot now: refused once the wait is over, having consumed nothing.
    brief = Limiter(
        redis=redis, load_tenant=load_empty, lease_ttl_s=60, timeout_s=2, concurrency_wait_s=0.2
    )
    refused = await brief.admit(rec, request_id="third", reserve=0)
    assert refused.refusal is not None
    assert refused.refusal.reason is Reason.CONCURRENCY
    assert not await redis.exists(f"{tenant_base(rec.tenant_id)}res:third")


async def settle(
    redis: aioredis.Redis, rec: KeyRecord, request_id: str, prompt: int, completion: int
) -> int:
    keys, args = settle_call(
        tenant_id=rec.tenant_id,
        key_id=rec.key_id,
        request_id=request_id,
        prompt_tokens=prompt,
        completion_tokens=completion,
        requested_at=dt.datetime.now(dt.UTC),
        ledger_ms=int(dt.datetime.now(dt.UTC).timestamp() * 1000),
    )
    result = await redis.eval(settle_script(), len(keys), *keys, *args)
    return int(result[0])


async def test_settle_replaces_the_reservation_and_releases_the_lease(
    redis: aioredis.Redis,
) -> None:
    """Settlement swaps reserved for actual tokens everywhere and frees the slot, once."""
    rec = record(key=Limits(concurrency=1, tpm=10_000), tenant=Limits(daily_tokens=5000))
    limiter = make_limiter(redis)
    assert (await limiter.admit(rec, request_id="r1", reserve=1000)).refusal is None
    assert (await limiter.admit(rec, request_id="r2", reserve=1)).refusal is not None
    assert await settle(redis, rec, "r1", 20, 80) == 1
    assert await settle(redis, rec, "r1", 20, 80) == 0  # idempotent
    base = tenant_base(rec.tenant_id)
    day = dt.datetime.now(dt.UTC).strftime("%Y%m%d")
    assert int(await redis.get(f"{base}day:t:{day}") or 0) == 100
    assert int(await redis.get(f"{base}tot:k:{rec.key_id}") or 0) == 100
    tpm = await redis.hgetall(f"{base}tpm:k:{rec.key_id}")
    assert sum(int(v) for k, v in tpm.items() if k.isdigit()) == 100
    assert int(tpm[b"sum"]) == 100  # the running sum admission reads
    assert (await limiter.admit(rec, request_id="r3", reserve=1)).refusal is None


async def test_settle_after_redis_lost_the_reservation(redis: aioredis.Redis) -> None:
    """Usage made durable after a rebuild is added; usage the rebuild counted is not."""
    rec = record()
    base = tenant_base(rec.tenant_id)
    now_ms = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    await redis.set(f"{base}loaded", now_ms)
    keys, args = settle_call(
        tenant_id=rec.tenant_id,
        key_id=rec.key_id,
        request_id="old",
        prompt_tokens=5,
        completion_tokens=5,
        requested_at=dt.datetime.now(dt.UTC),
        ledger_ms=now_ms - 1000,
    )
    assert (await redis.eval(settle_script(), len(keys), *keys, *args))[0] == 3
    assert await settle(redis, rec, "new", 7, 3) == 4
    assert int(await redis.get(f"{base}tot:t") or 0) == 10


async def test_unloaded_tenant_is_loaded_before_admission(redis: aioredis.Redis) -> None:
    """With no `loaded` sentinel, admission waits for the rebuild and then decides."""
    calls: list[str] = []
    source = load_script()

    async def load(rec: KeyRecord) -> None:
        calls.append(rec.tenant_id)
        total = f"{tenant_base(rec.tenant_id)}tot:t"
        keys, args = load_call(rec.tenant_id, now_ms=0, counters=[(total, 95, 0)])
        await redis.eval(source, len(keys), *keys, *args)

    limiter = Limiter(redis=redis, load_tenant=load, lease_ttl_s=60, timeout_s=2)
    rec = record(tenant=Limits(total_tokens=100))
    assert (await limiter.admit(rec, request_id="a", reserve=5)).refusal is None
    assert (await limiter.admit(rec, request_id="b", reserve=1)).refusal is not None
    assert calls == [rec.tenant_id]


async def test_redis_down_fails_closed_quickly() -> None:
    """With Redis unreachable admission raises StoreUnavailable, never admits."""
    client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    limiter = make_limiter(client)
    with pytest.raises(StoreUnavailable):
        await limiter.admit(record(), request_id="x", reserve=1)
    await client.aclose()


async def test_reservation_larger_than_a_limit_is_a_clear_error(redis: aioredis.Redis) -> None:
    """A request that could never fit is refused as such, not told to retry."""
    refusal = (
        await make_limiter(redis).admit(record(key=Limits(tpm=100)), request_id="x", reserve=500)
    ).refusal
    assert refusal is not None
    assert refusal.reason is Reason.RESERVATION_TOO_LARGE
    assert refusal.status == 400


def client_rate_headers(admitted: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """The x-ratelimit-* headers Caddy makes of policyd's X-Nz-Rate-* (caddy/gateway.caddy)."""
    result: dict[str, str] = {}
    for name, value in admitted:
        unit = {H_RATE_REQUESTS: "requests", H_RATE_TOKENS: "tokens"}[name]
        limit, remaining, reset = value.split(" ")
        result[f"x-ratelimit-limit-{unit}"] = limit
        result[f"x-ratelimit-remaining-{unit}"] = remaining
        result[f"x-ratelimit-reset-{unit}"] = f"{reset}s"
    return result


async def test_admission_reports_rate_limit_headers(redis: aioredis.Redis) -> None:
    """Admitted requests carry OpenAI-style remaining/limit/reset figures."""
    rec = record(key=Limits(rpm=10, tpm=1000))
    result = await make_limiter(redis).admit(rec, request_id="x", reserve=100)
    headers = client_rate_headers(result.headers)
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "9"
    assert headers["x-ratelimit-remaining-tokens"] == "900"
    assert headers["x-ratelimit-reset-tokens"] == "60s"


def test_calendar_boundaries() -> None:
    """Next day and next month are UTC boundaries, whatever the input zone."""
    at = dt.datetime(2026, 2, 28, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-2)))
    assert next_day(at) == dt.datetime(2026, 3, 2, tzinfo=dt.UTC)
    assert next_month(at) == dt.datetime(2026, 4, 1, tzinfo=dt.UTC)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 30)), min_size=1, max_size=25),
    rpm=st.integers(1, 6),
    tpm=st.integers(30, 120),
)
async def test_windows_match_a_reference_model(
    redis: aioredis.Redis, steps: list[tuple[int, int]], rpm: int, tpm: int
) -> None:
    """The script's sliding windows decide exactly like a one-second-bucket model."""
    clock = Clock(dt.datetime(2026, 11, 26, 12, 0, 0, tzinfo=dt.UTC))
    rec = record(key=Limits(rpm=rpm, tpm=tpm))
    limiter = make_limiter(redis, clock, lease_ttl_s=3600)
    history: list[tuple[int, int]] = []  # (second, tokens) of admitted requests
    for i, (gap, reserve) in enumerate(steps):
        clock.advance(gap)
        now_s = int(clock.now)
        live = [(s, t) for s, t in history if s > now_s - 60]
        expect = len(live) + 1 <= rpm and sum(t for _, t in live) + reserve <= tpm
        before = await snapshot(redis, rec)
        result = await limiter.admit(rec, request_id=f"r{i}", reserve=reserve)
        assert (result.refusal is None) == expect, (i, live, reserve)
        # Slots come back when the oldest request still counting leaves the window.
        oldest = min((s for s, _ in live), default=now_s)
        frees_in = f"{max(1, oldest + 60 - now_s)}s"
        if expect:
            headers = client_rate_headers(result.headers)
            assert headers["x-ratelimit-reset-requests"] == frees_in
            assert headers["x-ratelimit-reset-tokens"] == frees_in
            assert headers["x-ratelimit-remaining-requests"] == str(rpm - len(live) - 1)
            history.append((now_s, reserve))
        else:
            assert result.refusal is not None
            assert dict(result.refusal.headers)["retry-after"] == frees_in[:-1]
            after = await snapshot(redis, rec)
            assert {k: v for k, v in after.items() if b":rpm:" not in k and b":tpm:" not in k} == {
                k: v for k, v in before.items() if b":rpm:" not in k and b":tpm:" not in k
            }


async def test_unlimited_rate_and_concurrency_keep_no_windows(redis: aioredis.Redis) -> None:
    """Without a rate or concurrency limit no window or lease set is kept, budgets still count."""
    rec = record(tenant=Limits(rpm=50))
    limiter = make_limiter(redis)
    assert (await limiter.admit(rec, request_id="r1", reserve=10)).refusal is None
    assert await settle(redis, rec, "r1", 3, 4) == 1
    base = tenant_base(rec.tenant_id)
    kid = rec.key_id
    # The tenant's RPM applies to the key (default) and to the sum: both windows exist.
    assert await redis.exists(f"{base}rpm:k:{kid}", f"{base}rpm:t") == 2
    # No TPM or concurrency limit: nothing kept, and settlement created no TPM window.
    absent = [f"{base}tpm:k:{kid}", f"{base}tpm:t", f"{base}conc:k:{kid}", f"{base}conc:t"]
    assert await redis.exists(*absent) == 0
    assert int(await redis.get(f"{base}tot:k:{kid}") or 0) == 7


async def test_every_kept_window_and_counter_expires(redis: aioredis.Redis) -> None:
    """Windows, leases and calendar counters carry an expiry however often they are hit."""
    rec = record(key=Limits(rpm=1000, tpm=10**6, concurrency=100))
    limiter = make_limiter(redis)
    assert await admitted(limiter, rec, 20) == 20
    base = tenant_base(rec.tenant_id)
    now = dt.datetime.now(dt.UTC)
    day, month = now.strftime("%Y%m%d"), now.strftime("%Y%m")
    expiring = [
        f"{base}rpm:k:{rec.key_id}",
        f"{base}tpm:k:{rec.key_id}",
        f"{base}conc:k:{rec.key_id}",
        f"{base}day:k:{rec.key_id}:{day}",
        f"{base}day:t:{day}",
        f"{base}mon:k:{rec.key_id}:{month}",
        f"{base}mon:t:{month}",
    ]
    for name in expiring:
        assert await redis.ttl(name) > 0, name
    assert await redis.ttl(f"{base}tot:t") == -1  # the total never resets


async def test_a_limit_set_later_counts_from_then(redis: aioredis.Redis) -> None:
    """Requests admitted while a dimension was unlimited do not count against a new limit."""
    tenant_id, key_id = uuid.uuid4().hex, uuid.uuid4().hex
    limiter = make_limiter(redis)
    before = record(tenant_id=tenant_id, key_id=key_id)
    assert await admitted(limiter, before, 5) == 5
    after = record(tenant_id=tenant_id, key_id=key_id, key=Limits(rpm=3, concurrency=3))
    assert await admitted(limiter, after, 5) == 3


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 30), st.integers(1, 30), st.integers(0, 40)),
        min_size=1,
        max_size=20,
    ),
    tpm=st.integers(40, 120),
)
async def test_settled_windows_match_a_reference_model(
    redis: aioredis.Redis, steps: list[tuple[int, int, int]], tpm: int
) -> None:
    """Settlement replaces a reservation by actual tokens in the TPM window, as the model does."""
    # Settlement reads Redis' own clock: start at real time so buckets are still inside.
    clock = Clock(dt.datetime.now(dt.UTC))
    rec = record(key=Limits(tpm=tpm))
    limiter = make_limiter(redis, clock, lease_ttl_s=3600)
    history: dict[str, tuple[int, int]] = {}  # request id -> (second, tokens counted)
    for i, (gap, reserve, actual) in enumerate(steps):
        clock.advance(gap)
        now_s = int(clock.now)
        live = sum(t for s, t in history.values() if s > now_s - 60)
        result = await limiter.admit(rec, request_id=f"r{i}", reserve=reserve)
        assert (result.refusal is None) == (live + reserve <= tpm), (i, live, reserve)
        if result.refusal is None:
            history[f"r{i}"] = (now_s, reserve)
            if i % 2 == 0:  # every other request is settled before the next one arrives
                keys, args = settle_call(
                    tenant_id=rec.tenant_id,
                    key_id=rec.key_id,
                    request_id=f"r{i}",
                    prompt_tokens=actual // 2,
                    completion_tokens=actual - actual // 2,
                    requested_at=dt.datetime.fromtimestamp(clock.now, dt.UTC),
                    ledger_ms=int(time.time() * 1000),
                )
                assert (await redis.eval(settle_script(), len(keys), *keys, *args))[0] == 1
                history[f"r{i}"] = (now_s, actual)


async def test_a_script_error_is_a_fault_not_an_outage(redis: aioredis.Redis) -> None:
    """A Lua error (here WRONGTYPE) is a bug: StoreFault (500, logged), never "retry in 1 s"."""
    rec = record(key=Limits(concurrency=1))
    limiter = make_limiter(redis)
    assert (await limiter.admit(rec, request_id="warm", reserve=1)).refusal is None
    await redis.delete(f"{tenant_base(rec.tenant_id)}conc:k:{rec.key_id}")
    await redis.set(f"{tenant_base(rec.tenant_id)}conc:k:{rec.key_id}", "not a sorted set")
    with pytest.raises(StoreFault) as caught:
        await limiter.admit(rec, request_id="r", reserve=1)
    assert not isinstance(caught.value, StoreUnavailable)
    assert "WRONGTYPE" in str(caught.value) or "wrong kind" in str(caught.value)

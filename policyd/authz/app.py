"""`create_app()`: the policyd ASGI application, as Granian serves it (`--factory`).

`/authz` is served by `fastpath.PolicyApp` without a framework; the rest by Litestar,
whose lifespan opens Postgres, Redis and the HTTP client for both.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

import httpx
from litestar import Litestar
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.ext.asyncio import create_async_engine

from policyd.authz.endpoints import healthz, metrics_text, readyz, statsz
from policyd.authz.fastpath import PolicyApp
from policyd.authz.keystore import KeyStore
from policyd.authz.lastused import LastUsedTracker
from policyd.authz.limits import Limiter
from policyd.authz.rebuild import TenantLoader
from policyd.authz.services import Services
from policyd.authz.settings import Settings, load_settings
from policyd.authz.tarpit import Tarpit
from policyd.authz.upstreams import UpstreamPool
from policyd.shared.contract import load_script
from policyd.shared.resp import RespClient, supports
from policyd.shared.sentinel import primary_locator, redis_client

__all__ = ["create_app"]


def _lifespan(settings: Settings) -> Callable[[Litestar], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # Every resource is closed on the way out, in reverse order, even when one close
        # fails (the exit stack runs the others and re-raises).
        async with AsyncExitStack() as opened:
            engine = create_async_engine(
                settings.database_url, pool_size=5, max_overflow=5, pool_pre_ping=True
            )
            opened.push_async_callback(engine.dispose)
            redis = redis_client(
                settings.redis_url,
                settings.sentinels,
                socket_timeout=settings.store_timeout_s,
                socket_connect_timeout=settings.store_timeout_s,
                max_connections=64,
                # A burst beyond the pool waits for a connection (within the store deadline)
                # instead of failing: with a `rediss://` URL every call goes through here.
                wait_for_connection_s=settings.store_timeout_s,
                # The hot path no longer uses this pool, so after a Redis restart its idle
                # connections are found dead only when used: reconnect once, right away.
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            )
            opened.push_async_callback(redis.aclose)
            # The per-request Redis calls go through the lean client where the URL allows.
            hot = None
            if supports(settings.redis_url):
                hot = RespClient(
                    url=settings.redis_url,
                    timeout_s=settings.store_timeout_s,
                    locate=primary_locator(settings.sentinels, timeout_s=settings.store_timeout_s),
                )
                opened.push_async_callback(hot.aclose)
            http = await opened.enter_async_context(
                httpx.AsyncClient(timeout=settings.ready_timeout_s)
            )
            last_used = LastUsedTracker(engine=engine, interval_s=settings.last_used_flush_s)
            loader = TenantLoader(
                engine=engine,
                redis=redis,
                load_script=load_script(),
                timeout_s=settings.store_timeout_s,
            )
            limiter = Limiter(
                redis=redis,
                load_tenant=loader,
                lease_ttl_s=settings.lease_ttl_s,
                concurrency_wait_s=settings.concurrency_wait_s,
                timeout_s=settings.store_timeout_s,
                hot=hot,
            )
            upstreams = UpstreamPool(
                settings.upstreams, http=http, interval_s=settings.upstream_refresh_s
            )
            app.state.services = Services(
                settings=settings,
                engine=engine,
                redis=redis,
                http=http,
                keys=KeyStore(settings=settings, redis=redis, engine=engine, hot=hot),
                limiter=limiter,
                last_used=last_used,
                upstreams=upstreams,
                tarpit=Tarpit(
                    delay_s=settings.auth_tarpit_s,
                    client_budget=settings.auth_tarpit_client_budget,
                    window_s=settings.auth_failure_window_s,
                    max_held=settings.auth_tarpit_max_held,
                ),
            )
            last_used.start()
            opened.push_async_callback(last_used.stop)
            if upstreams.multi:
                upstreams.start()
                opened.push_async_callback(upstreams.stop)
            yield

    return lifespan


def create_app(settings: Settings | None = None) -> PolicyApp:
    """Build the app; settings default to the NZ_* environment, read now and only now."""
    resolved = settings if settings is not None else load_settings()
    logging.basicConfig(
        level=resolved.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    return PolicyApp(
        Litestar(
            route_handlers=[healthz, readyz, statsz, metrics_text],
            lifespan=[_lifespan(resolved)],
            openapi_config=None,
            debug=False,
        )
    )

"""What policyd answers: `/authz` for Caddy's forward_auth, `/healthz`, `/readyz`, `/statsz`.

`decide_authz` turns forward_auth's headers into a `Verdict`; `fastpath` serves it without
a web framework (it is the hot path). The probes and `/statsz` are Litestar handlers.
The decision itself lives in `decide`, `keystore` and `limits`.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Final

import attrs
import httpx
import msgspec
import redis.asyncio as aioredis
from litestar import Request, Response, get
from sqlalchemy.ext.asyncio import AsyncEngine

from policyd.authz.health import probe_all
from policyd.authz.keystore import KeyStore
from policyd.authz.lastused import LastUsedTracker
from policyd.authz.limits import Limiter
from policyd.authz.refusals import Reason, Refusal, render
from policyd.authz.screening import admit, check_key_policy, reservation, screen_request
from policyd.authz.settings import Settings
from policyd.shared.contract import Surface
from policyd.shared.errors import StoreUnavailable

__all__ = ["Services", "Verdict", "decide_authz", "healthz", "readyz", "statsz"]

_log = logging.getLogger("policyd.authz")

_JSON: Final = "application/json"
_UNAVAILABLE: Final = Refusal(
    reason=Reason.UNAVAILABLE,
    message="the gateway cannot verify this request right now; try again shortly",
    headers=(("retry-after", "1"),),
)


@attrs.define(kw_only=True)
class Services:
    """What the handlers need, opened in the app's lifespan and kept on `app.state`."""

    settings: Settings
    engine: AsyncEngine
    redis: aioredis.Redis
    http: httpx.AsyncClient
    keys: KeyStore
    limiter: Limiter
    last_used: LastUsedTracker


def _services(request: Request[Any, Any, Any]) -> Services:
    services: Services = request.app.state.services
    return services


@attrs.frozen
class Verdict:
    """policyd's answer to one forward_auth call, before any HTTP framework sees it."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""


def _refused(refusal: Refusal, surface: Surface, request_id: str) -> Verdict:
    status, body, headers = render(refusal, surface, request_id=request_id)
    return Verdict(status, headers, body)


async def decide_authz(
    services: Services,
    *,
    method: str,
    target: str,
    body: str | None,
    authorization: str | None,
    request_id: str,
) -> Verdict:
    """Decide one request for Caddy: 2xx with X-Nz-* headers, or the client's refusal.

    The arguments are forward_auth's headers: X-Forwarded-Method, X-Forwarded-Uri,
    X-Nz-Body, Authorization and X-Request-Id.
    """
    screened = screen_request(method, target, body, max_body_bytes=services.settings.max_body_bytes)
    if screened.refusal is not None:
        _log.info("refused %s: %s", request_id, screened.refusal.reason)
        return _refused(screened.refusal, screened.surface, request_id)
    try:
        result = await services.keys.authenticate(authorization)
    except StoreUnavailable as exc:
        _log.warning("failing closed for %s: %s", request_id, exc)
        return _refused(_UNAVAILABLE, screened.surface, request_id)
    if result.record is None:
        assert result.refusal is not None
        _log.info("refused %s: %s", request_id, result.refusal)
        refusal = Refusal(reason=result.refusal, message=_AUTH_MESSAGES[result.refusal])
        return _refused(refusal, screened.surface, request_id)
    record = result.record
    services.last_used.touch(record.key_id)
    policy_refusal = check_key_policy(screened, record)
    if policy_refusal is not None:
        _log.info("refused %s for key %s: %s", request_id, record.prefix, policy_refusal.reason)
        return _refused(policy_refusal, screened.surface, request_id)
    reserved = reservation(screened, record)
    try:
        admission = await services.limiter.admit(
            record, request_id=request_id or uuid.uuid4().hex, reserve=reserved
        )
    except StoreUnavailable as exc:
        _log.warning("failing closed for %s: %s", request_id, exc)
        return _refused(_UNAVAILABLE, screened.surface, request_id)
    if admission.refusal is not None:
        _log.info("refused %s for key %s: %s", request_id, record.prefix, admission.refusal.reason)
        limited = attrs.evolve(
            admission.refusal, headers=admission.refusal.headers + admission.headers
        )
        return _refused(limited, screened.surface, request_id)
    upstream = admit(screened, record, reserved=reserved)
    upstream.extend(admission.headers)
    return Verdict(200, upstream)


_AUTH_MESSAGES: Final = {
    Reason.MISSING_KEY: "missing API key: send 'Authorization: Bearer nz_...'",
    Reason.MALFORMED_KEY: "malformed API key",
    Reason.INVALID_KEY: "invalid API key",
    Reason.REVOKED_KEY: "this API key has been revoked",
    Reason.EXPIRED_KEY: "this API key has expired",
}


@get("/healthz", include_in_schema=False)
async def healthz() -> Response[bytes]:
    """Liveness: the process answers. Says nothing about its dependencies."""
    return Response(content=b'{"status":"ok"}', media_type=_JSON)


@get("/readyz", include_in_schema=False)
async def readyz(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Readiness: 200 only when Postgres, Redis and Ollama all answer; else 503 naming them."""
    services = _services(request)
    checks = await probe_all(
        engine=services.engine,
        redis=services.redis,
        http=services.http,
        ollama_url=services.settings.ollama_url,
        timeout_s=services.settings.ready_timeout_s,
    )
    down = sorted(name for name, state in checks.items() if state != "ok")
    if down:
        body = {"status": "unavailable", "down": down, "checks": checks}
        return Response(content=msgspec.json.encode(body), status_code=503, media_type=_JSON)
    body_ok = {"status": "ready", "checks": checks}
    return Response(content=msgspec.json.encode(body_ok), media_type=_JSON)


@get("/statsz", include_in_schema=False)
async def statsz(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Counters for benchmarks and operators; only on the socket (Caddy never routes here)."""
    services = _services(request)
    body = {"argon2_runs": services.keys.argon2_runs}
    return Response(content=msgspec.json.encode(body), media_type=_JSON)

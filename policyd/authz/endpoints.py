"""policyd's Litestar handlers: `/healthz`, `/readyz`, `/statsz`, `/metrics`.

`/authz`, the hot path, is answered by `fastpath` with `decision.decide_authz`.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec
from litestar import Request, Response, get

from policyd.authz import metrics
from policyd.authz.health import probe_all
from policyd.authz.services import Services

__all__ = ["healthz", "metrics_text", "readyz", "statsz"]

_JSON: Final = "application/json"


def _services(request: Request[Any, Any, Any]) -> Services:
    services: Services = request.app.state.services
    return services


@get("/healthz", include_in_schema=False)
async def healthz() -> Response[bytes]:
    """Liveness: the process answers. Says nothing about its dependencies."""
    return Response(content=b'{"status":"ok"}', media_type=_JSON)


@get("/readyz", include_in_schema=False)
async def readyz(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Readiness: 200 only when Postgres, Redis and at least one Ollama host answer.

    `upstreams` reports each host; `ollama` is ok while any of them is (Caddy sends
    requests only to the healthy ones).
    """
    services = _services(request)
    checks, hosts = await probe_all(
        engine=services.engine,
        redis=services.redis,
        http=services.http,
        ollama_urls=[upstream.url for upstream in services.settings.upstreams],
        timeout_s=services.settings.ready_timeout_s,
    )
    down = sorted(name for name, state in checks.items() if state != "ok")
    body: dict[str, Any] = {"status": "unavailable" if down else "ready"}
    if down:
        body["down"] = down
    body |= {"checks": checks, "upstreams": hosts}
    return Response(
        content=msgspec.json.encode(body), status_code=503 if down else 200, media_type=_JSON
    )


@get("/statsz", include_in_schema=False)
async def statsz(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Counters for benchmarks and operators; only on the socket (Caddy never routes here)."""
    services = _services(request)
    keys = services.keys
    body = {
        "argon2_runs": keys.argon2_runs,
        "argon2_pads": keys.lanes.pads,
        "argon2_throttled": keys.lanes.throttled,
        "auth_failures_remembered": keys.failures_remembered,
        "auth_failures_over_budget": keys.failures_over_budget,
        "auth_refusals_held": services.tarpit.held,
        "auth_refusals_overflowed": services.tarpit.overflowed,
        "bodies_screened": services.stats.bodies_screened,
    }
    return Response(content=msgspec.json.encode(body), media_type=_JSON)


@get("/metrics", include_in_schema=False, sync_to_thread=False)
def metrics_text() -> Response[bytes]:
    """Prometheus text format; only on the socket (Caddy's public site never routes here)."""
    return Response(content=metrics.exposition(), media_type=metrics.CONTENT_TYPE)

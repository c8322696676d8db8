"""What policyd's handlers share: the stores and workers opened in the app's lifespan."""

from __future__ import annotations

import attrs
import httpx
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine

from policyd.authz.keystore import KeyStore
from policyd.authz.lastused import LastUsedTracker
from policyd.authz.limits import Limiter
from policyd.authz.settings import Settings
from policyd.authz.stats import Stats
from policyd.authz.tarpit import Tarpit
from policyd.authz.upstreams import UpstreamPool

__all__ = ["Services"]


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
    upstreams: UpstreamPool
    tarpit: Tarpit
    stats: Stats = attrs.field(factory=Stats)

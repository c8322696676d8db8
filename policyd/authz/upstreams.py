"""Several Ollama hosts: which host has which model, and the route Caddy should take.

policyd learns each host's models from its `GET /api/tags` (refreshed in the background)
and, per model, orders the hosts that have it by rendezvous hashing of (host, model): the
same model keeps landing on the same host while that host is healthy (so it stays loaded
there), and losing or adding a host moves only that host's models.

The route travels to Caddy as a `Cookie` request header (`H_ROUTE`, copied as `Cookie`):
`nz_upstream=<first>; nz_spill=<second>`, each the HMAC-SHA256 of the host's dial address
under an empty key, which is what Caddy's `lb_policy cookie` compares. Caddy keeps the
health checks, the retries and the saturation limit: when the first host is down or full
it takes the second, then the least busy of all (see docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

import attrs
import httpx

__all__ = [
    "COOKIE_FIRST",
    "COOKIE_SPILL",
    "HostState",
    "Route",
    "RouteKind",
    "Upstream",
    "UpstreamPool",
    "model_ref",
    "openai_model",
    "parse_upstreams",
]

_log = logging.getLogger("policyd.upstreams")

#: Cookie names the Caddyfile's `lb_policy cookie` reads (caddy/gateway.caddy).
COOKIE_FIRST: Final = "nz_upstream"
COOKIE_SPILL: Final = "nz_spill"
#: A listing larger than this is not a real Ollama's; refuse to hold it.
_MAX_TAGS_BYTES: Final = 8 * 1024 * 1024
#: Marks policyd's own listing reads, as Caddy's health checks are marked (tests and
#: host logs tell them from client requests).
_PROBE: Final = {"X-Nz-Health-Check": "policyd"}
#: A miss is re-checked against the hosts at most this often (unknown names are free to send).
_MISS_RECHECK_S: Final = 1.0
#: Fractional seconds beyond microseconds, which `datetime.fromisoformat` refuses.
_MICROS: Final = re.compile(r"(\.\d{6})\d+")


@attrs.frozen
class Upstream:
    """One Ollama host: its base URL and the address Caddy dials (and hashes)."""

    url: str
    dial: str

    @property
    def cookie(self) -> str:
        """The value Caddy's cookie policy expects for this host (empty secret)."""
        return hmac.new(b"", self.dial.encode(), hashlib.sha256).hexdigest()


def parse_upstreams(value: str) -> tuple[tuple[Upstream, ...], list[str]]:
    """NZ_OLLAMA_URL: one or more base URLs separated by spaces, as Caddy's `reverse_proxy`.

    Returns the hosts and every problem found. Caddy splits the variable on whitespace,
    so commas are refused rather than guessed at; all hosts share one scheme because
    one `reverse_proxy` speaks one transport.
    """
    errors: list[str] = []
    hosts: list[Upstream] = []
    if "," in value:
        errors.append("NZ_OLLAMA_URL: separate several hosts with spaces, not commas")
        return (), errors
    # Values are not echoed: a URL may carry credentials (which are refused anyway).
    for number, item in enumerate(value.split(), start=1):
        parts = urlsplit(item)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            errors.append(f"NZ_OLLAMA_URL must start with one of http://, https:// (host {number})")
            continue
        if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
            errors.append(f"NZ_OLLAMA_URL host {number} must be a bare base URL (no path or user)")
            continue
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            errors.append(f"NZ_OLLAMA_URL host {number} has an invalid port")
            continue
        host = parts.hostname
        dial_host = f"[{host}]" if ":" in host else host
        hosts.append(Upstream(url=item.rstrip("/"), dial=f"{dial_host}:{port}"))
    if len({urlsplit(h.url).scheme for h in hosts}) > 1:
        errors.append("NZ_OLLAMA_URL: all hosts must use the same scheme")
    if len({h.dial for h in hosts}) != len(hosts):
        errors.append("NZ_OLLAMA_URL: a host is listed twice")
    if not hosts and not errors:
        errors.append("NZ_OLLAMA_URL is required")
    return tuple(hosts), errors


_DEFAULT_PREFIXES: Final = ("registry.ollama.ai/", "library/")


def model_ref(name: str) -> str:
    """A model name folded as Ollama matches it: case-insensitive, `:latest` when untagged,
    the default registry and namespace left out."""
    folded = name.strip().lower()
    for prefix in _DEFAULT_PREFIXES:
        folded = folded.removeprefix(prefix)
    head, sep, tag = folded.rpartition(":")
    if sep and "/" not in tag and head:
        return folded
    return f"{folded}:latest"


class RouteKind(enum.Enum):
    """What policyd knows about where a model lives."""

    #: Some host has it: `header` names the route.
    ROUTED = "routed"
    #: Every host answered and none has it: the caller gets a 404.
    MISSING = "missing"
    #: Not every host answered: let Caddy pick (it knows which are healthy).
    UNKNOWN = "unknown"


@attrs.frozen
class Route:
    kind: RouteKind
    header: str | None = None


_UNKNOWN: Final = Route(RouteKind.UNKNOWN)
_MISSING: Final = Route(RouteKind.MISSING)


@attrs.define
class HostState:
    """The last `/api/tags` of one host."""

    upstream: Upstream
    ok: bool = False
    error: str = "not checked yet"
    checked_at: float = 0.0
    models: frozenset[str] = frozenset()
    #: The listing's entries as the host sent them, for the merged `/api/tags`.
    entries: tuple[dict[str, Any], ...] = ()


def _affinity(upstream: Upstream, ref: str) -> bytes:
    return hashlib.blake2b(f"{upstream.dial}\0{ref}".encode(), digest_size=8).digest()


def _routes(states: Sequence[HostState]) -> dict[str, Route]:
    """Per model, the hosts that have it in rendezvous order, as the Cookie header."""
    holders: dict[str, list[Upstream]] = {}
    for state in states:
        if state.ok:
            for ref in state.models:
                holders.setdefault(ref, []).append(state.upstream)
    routes = {}
    for ref, hosts in holders.items():
        ranked = sorted(hosts, key=lambda up: _affinity(up, ref), reverse=True)
        cookie = f"{COOKIE_FIRST}={ranked[0].cookie}"
        if len(ranked) > 1:
            cookie += f"; {COOKIE_SPILL}={ranked[1].cookie}"
        routes[ref] = Route(RouteKind.ROUTED, cookie)
    return routes


def _entries(payload: object) -> tuple[dict[str, Any], ...]:
    if not isinstance(payload, dict) or not isinstance(payload.get("models"), list):
        raise ValueError("not an /api/tags listing")
    return tuple(
        entry
        for entry in payload["models"]
        if isinstance(entry, dict) and isinstance(entry.get("name"), str)
    )


class UpstreamPool:
    """The hosts behind the gateway and what each serves, refreshed every `interval_s`."""

    def __init__(
        self, hosts: Iterable[Upstream], *, http: httpx.AsyncClient, interval_s: float = 5.0
    ) -> None:
        self.states: Final = [HostState(upstream) for upstream in hosts]
        self._http = http
        self._interval_s = interval_s
        self._routes: dict[str, Route] = {}
        self._complete = False
        self._refreshed_at = 0.0
        self._refreshing: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None

    @property
    def multi(self) -> bool:
        """More than one host: only then is there a route to choose."""
        return len(self.states) > 1

    def route(self, model: str) -> Route:
        """Where `model` should go; never waits (the hot path calls it)."""
        found = self._routes.get(model_ref(model))
        if found is not None:
            return found
        return _MISSING if self._complete else _UNKNOWN

    async def route_or_recheck(self, model: str) -> Route:
        """`route`, but a miss is checked against the hosts first (a model pulled just now)."""
        found = self.route(model)
        if found.kind is RouteKind.ROUTED:
            return found
        if time.monotonic() - self._refreshed_at >= _MISS_RECHECK_S:
            await self.refresh()
        return self.route(model)

    async def refresh(self) -> None:
        """Ask every host for its models at once; callers arriving meanwhile share the answer."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        await asyncio.gather(*(self._check(state) for state in self.states))
        self.rebuild()
        self._refreshed_at = time.monotonic()

    def rebuild(self) -> None:
        """Recompute every model's route from `states` (swapped in whole: readers never wait)."""
        self._routes = _routes(self.states)
        self._complete = all(state.ok for state in self.states)

    async def _check(self, state: HostState) -> None:
        try:
            reply = await self._http.get(f"{state.upstream.url}/api/tags", headers=_PROBE)
            reply.raise_for_status()
            if len(reply.content) > _MAX_TAGS_BYTES:
                raise ValueError("listing too large")
            entries = _entries(reply.json())
        except (httpx.HTTPError, OSError, ValueError) as exc:
            if state.ok:
                _log.warning("upstream %s is down: %s", state.upstream.url, exc)
            state.ok, state.error = False, f"down ({type(exc).__name__})"
            return
        if not state.ok:
            _log.info("upstream %s serves %d models", state.upstream.url, len(entries))
        state.ok, state.error, state.checked_at = True, "ok", time.monotonic()
        state.entries = entries
        state.models = frozenset(model_ref(entry["name"]) for entry in entries)

    def merged_tags(self) -> list[dict[str, Any]]:
        """The union of the healthy hosts' listings, one entry per model, in host order
        (each host lists its newest first, as Ollama does; the first host's entry wins)."""
        seen: dict[str, dict[str, Any]] = {}
        for state in self.states:
            if not state.ok:
                continue
            for entry in state.entries:
                seen.setdefault(model_ref(entry["name"]), entry)
        return list(seen.values())

    def serving(self) -> bool:
        """Whether any host answered its last listing."""
        return any(state.ok for state in self.states)

    async def merged_live(self, path: str, field: str) -> list[dict[str, Any]]:
        """`GET path` on every healthy host at once, the `field` lists joined (host order).

        A host that fails now is left out; the listing says what the others have.
        """
        healthy = [state.upstream for state in self.states if state.ok]

        async def one(upstream: Upstream) -> list[dict[str, Any]]:
            try:
                reply = await self._http.get(f"{upstream.url}{path}")
                reply.raise_for_status()
                payload = reply.json()
            except (httpx.HTTPError, OSError, ValueError):
                return []
            entries = payload.get(field) if isinstance(payload, dict) else None
            return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []

        found = await asyncio.gather(*(one(upstream) for upstream in healthy))
        return [entry for entries in found for entry in entries]

    def host_report(self) -> Mapping[str, str]:
        """url -> 'ok' or what went wrong, as of the last refresh."""
        return {state.upstream.url: state.error for state in self.states}

    def start(self) -> None:
        """Refresh now and then every `interval_s` until `stop`."""
        self._loop_task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # a bug here must not end the refreshing for good
                _log.exception("refreshing the upstream listing failed")
            await asyncio.sleep(self._interval_s)

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._refreshing is not None and not self._refreshing.done():
            self._refreshing.cancel()
            await asyncio.gather(self._refreshing, return_exceptions=True)


def openai_model(entry: Mapping[str, Any]) -> dict[str, Any]:
    """One `/api/tags` entry as Ollama's `/v1/models` lists it."""
    name = str(entry["name"])
    created = 0
    modified = entry.get("modified_at")
    if isinstance(modified, str):
        with contextlib.suppress(ValueError):
            # Ollama writes nanoseconds; Python parses at most microseconds.
            created = int(dt.datetime.fromisoformat(_MICROS.sub(r"\1", modified)).timestamp())
    path = name.rpartition(":")[0] or name
    owner = path.rsplit("/", 2)[-2] if "/" in path else "library"
    return {"id": name, "object": "model", "created": created, "owned_by": owner}

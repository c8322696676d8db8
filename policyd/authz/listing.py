"""Model listings scoped to the key: `/api/tags`, `/api/ps` and `/v1/models`.

Ollama lists every model it has (and `/api/ps` every model other tenants loaded). For a
key with a model allowlist, policyd fetches the listing itself, keeps the entries the
key may use, and answers with it in `H_LISTING`; Caddy sends that to the client and
never proxies the request (stock Caddy cannot filter a proxied reply's body, and a
forward_auth 2xx always means "proxy"). A key without an allowlist may use every model,
so its listing is Ollama's own, proxied as before.

With several Ollama hosts every listing is policyd's: the union of the hosts' models
(`upstreams.UpstreamPool`), filtered the same way for a key with an allowlist.
"""

from __future__ import annotations

import json
from typing import Any, Final

import httpx

from policyd.authz.screening import model_allowed
from policyd.authz.upstreams import UpstreamPool, openai_model

__all__ = ["LISTING_PATHS", "ListingUnavailable", "filtered_listing", "merged_listing"]

#: Listing endpoint -> (the list's field in the reply, the name field of an entry).
LISTING_PATHS: Final = {
    "/api/tags": ("models", "name"),
    "/api/ps": ("models", "name"),
    "/v1/models": ("data", "id"),
}


class ListingUnavailable(Exception):
    """Ollama's listing could not be read; the request fails closed (503)."""


def _entry_name(entry: Any, name_field: str) -> str | None:
    if not isinstance(entry, dict):
        return None
    name = entry.get(name_field) or entry.get("model")
    return name if isinstance(name, str) else None


async def filtered_listing(
    http: httpx.AsyncClient, ollama_url: str, path: str, allowed: tuple[str, ...]
) -> str:
    """Ollama's listing at `path` with only the models `allowed` admits, as ASCII JSON."""
    try:
        reply = await http.get(f"{ollama_url}{path}", headers={"Host": "localhost"})
        reply.raise_for_status()
        listing = reply.json()
    except (httpx.HTTPError, OSError, ValueError) as exc:
        raise ListingUnavailable(f"{path}: {exc.__class__.__name__}") from exc
    return _scoped(listing, path, allowed)


def _scoped(listing: Any, path: str, allowed: tuple[str, ...] | None) -> str:
    """`listing` with only the entries `allowed` admits (all if None), as ASCII JSON."""
    list_field, name_field = LISTING_PATHS[path]
    entries = listing.get(list_field) if isinstance(listing, dict) else None
    if not isinstance(entries, list):
        raise ListingUnavailable(f"{path}: no {list_field!r} list in Ollama's reply")
    kept = []
    for entry in entries:
        name = _entry_name(entry, name_field)
        if name is not None and (allowed is None or model_allowed(name, allowed)):
            kept.append(entry)
    listing[list_field] = kept
    return json.dumps(listing, ensure_ascii=True, separators=(",", ":"))


async def merged_listing(pool: UpstreamPool, path: str, allowed: tuple[str, ...] | None) -> str:
    """Every healthy host's listing at `path` as one, filtered by `allowed` (None: all).

    `/api/tags` and `/v1/models` come from the hosts' last `/api/tags` (refreshed in the
    background); `/api/ps` (what is loaded now) is asked of every healthy host at once.
    """
    if path == "/api/tags":
        listing: dict[str, Any] = {"models": pool.merged_tags()}
    elif path == "/v1/models":
        listing = {"object": "list", "data": [openai_model(e) for e in pool.merged_tags()]}
    else:
        listing = {"models": await pool.merged_live(path, "models")}
    if not pool.serving():
        raise ListingUnavailable(f"{path}: no Ollama host answers")
    return _scoped(listing, path, allowed)

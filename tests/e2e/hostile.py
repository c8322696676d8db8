"""Helpers for the hostile-client tests: policyd's counters and hand-made keys."""

from __future__ import annotations

import secrets
import string
from pathlib import Path

import httpx

__all__ = ["counters", "other_secret", "unknown_prefix_key"]

_SECRET_ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase


def counters(socket_path: Path) -> dict[str, int]:
    """policyd's /statsz, read on its socket (Caddy never routes there)."""
    transport = httpx.HTTPTransport(uds=str(socket_path))
    with httpx.Client(transport=transport, base_url="http://policyd", timeout=10) as client:
        reply = client.get("/statsz")
    reply.raise_for_status()
    found: dict[str, int] = reply.json()
    return found


def other_secret(key: str) -> str:
    """A well-formed key with `key`'s prefix and a fresh random secret."""
    prefix = key.rsplit("_", 1)[0]
    return f"{prefix}_" + "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(43))


def unknown_prefix_key() -> str:
    """A well-formed key whose random prefix no tenant owns."""
    prefix = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(8))
    return other_secret(f"nz_{prefix}_x")

"""Read the JSON that `caddy adapt` makes of the project's Caddyfiles."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from tests.caddy.runner import caddy_binary

__all__ = [
    "TEST_ENV",
    "access_log_config",
    "adapt",
    "gateway_handlers",
    "gateway_server",
    "is_forward_auth",
    "is_key_gate",
    "is_ollama_proxy",
    "metrics_server",
]

#: Settings both Caddyfiles need; paths are replaced per test by `test_env`.
TEST_ENV: Final = {
    "NZ_DOMAIN": "gateway.example.test",
    "NZ_OLLAMA_URL": "http://127.0.0.1:11500",
    "NZ_MAX_BODY_BYTES": "8388608",
}

JsonObject = dict[str, Any]


def adapt(caddyfile: Path, *, env: Mapping[str, str]) -> JsonObject:
    """The Caddy JSON config `caddyfile` adapts to under `env`."""
    done = subprocess.run(
        [caddy_binary(), "adapt", "--config", str(caddyfile), "--adapter", "caddyfile"],
        env=dict(env),
        capture_output=True,
        check=True,
    )
    config: JsonObject = json.loads(done.stdout)
    return config


def _walk(handlers: list[JsonObject]) -> Iterator[tuple[JsonObject, list[JsonObject]]]:
    """Each handler with the matchers guarding it, in execution order (subroutes inlined)."""
    for handler in handlers:
        yield handler, []
        if handler["handler"] == "subroute":
            for route in handler["routes"]:
                for inner, matchers in _walk(route["handle"]):
                    yield inner, [*route.get("match", []), *matchers]


def _serves_metrics(server: JsonObject) -> bool:
    return any(
        handler["handler"] == "metrics"
        for route in server["routes"]
        for handler, _ in _walk(route["handle"])
    )


def gateway_server(config: JsonObject) -> JsonObject:
    """The public site's server (the other one is the internal metrics listener)."""
    servers: list[JsonObject] = list(config["apps"]["http"]["servers"].values())
    (server,) = [s for s in servers if not _serves_metrics(s)]
    return server


def metrics_server(config: JsonObject) -> JsonObject:
    """The internal metrics listener's server."""
    servers: list[JsonObject] = list(config["apps"]["http"]["servers"].values())
    (server,) = [s for s in servers if _serves_metrics(s)]
    return server


def gateway_handlers(config: JsonObject) -> list[tuple[JsonObject, list[JsonObject]]]:
    """Handlers of the public site's routes, in the order Caddy runs them."""
    server = gateway_server(config)
    walked: list[tuple[JsonObject, list[JsonObject]]] = []
    for route in server["routes"]:
        for handler, matchers in _walk(route["handle"]):
            walked.append((handler, [*route.get("match", []), *matchers]))
    return walked


def _asks_policyd(handler: JsonObject) -> bool:
    # forward_auth adapts to a reverse_proxy that rewrites the request to GET /authz.
    rewrite = handler.get("rewrite", {})
    return handler["handler"] == "reverse_proxy" and str(rewrite.get("uri", "")).startswith(
        "/authz"
    )


def _sends_body(handler: JsonObject) -> bool:
    return "X-Nz-Body" in handler.get("headers", {}).get("request", {}).get("set", {})


def is_forward_auth(handler: JsonObject) -> bool:
    """The forward_auth that hands policyd the body (X-Nz-Body) and copies its grant."""
    return _asks_policyd(handler) and _sends_body(handler)


def is_key_gate(handler: JsonObject) -> bool:
    """The forward_auth asking policyd about path and key alone, before a body is read."""
    return _asks_policyd(handler) and handler["rewrite"]["uri"].startswith("/authz/key")


def is_ollama_proxy(handler: JsonObject) -> bool:
    """The reverse_proxy whose upstream is NZ_OLLAMA_URL."""
    return handler["handler"] == "reverse_proxy" and handler.get("upstreams") == [
        {"dial": "127.0.0.1:11500"}
    ]


def access_log_config(config: JsonObject) -> JsonObject:
    """The logger Caddy writes the site's access lines to."""
    logs: dict[str, JsonObject] = config["logging"]["logs"]
    (access,) = [
        log
        for log in logs.values()
        if any(name.startswith("http.log.access") for name in log.get("include", []))
    ]
    return access

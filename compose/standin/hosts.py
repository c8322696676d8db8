"""Ollama's two middlewares: gin-contrib/cors, then the allowed-Host check.

Both run for every routed request, including 404 and 405 answers, but not for redirects
(gin redirects before it runs any handler). The Host check applies only when the server
listens on a loopback address, as Ollama's does by default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from typing import Final, Literal

__all__ = ["CorsVerdict", "cors_verdict", "host_verdict", "split_host_port"]

_PRIVATE_NETS: Final = tuple(
    ipaddress.ip_network(net)
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_LOCAL_SUFFIXES: Final = (".localhost", ".local", ".internal")

# Ollama's default origins: these hosts with any port, plus a few app schemes.
_LOCAL_ORIGINS: Final = tuple(
    f"{scheme}://{host}"
    for scheme in ("http", "https")
    for host in ("localhost", "127.0.0.1", "0.0.0.0")  # noqa: S104 - an origin, not a bind # nosec B104
)
_EXACT_ORIGINS: Final = frozenset(_LOCAL_ORIGINS)
_ORIGIN_PREFIXES: Final = (
    *(f"{origin}:" for origin in _LOCAL_ORIGINS),
    "app://",
    "file://",
    "tauri://",
    "vscode-webview://",
    "vscode-file://",
)
_ALLOW_HEADERS: Final = ",".join(
    (
        "Authorization",
        "Content-Type",
        "User-Agent",
        "Accept",
        "X-Requested-With",
        "Openai-Beta",
        "X-Stainless-Arch",
        "X-Stainless-Async",
        "X-Stainless-Custom-Poll-Interval",
        "X-Stainless-Helper-Method",
        "X-Stainless-Lang",
        "X-Stainless-Package-Version",
        "X-Stainless-Poll-Helper",
        "X-Stainless-Retry-Count",
        "X-Stainless-Runtime",
        "X-Stainless-Runtime-Version",
        "X-Stainless-Timeout",
    )
)

_HOSTNAME: Final = socket.gethostname().lower()


def split_host_port(hostport: str) -> str | None:
    """The host of `host:port` as Go's net.SplitHostPort sees it, or None on its errors."""
    if hostport.startswith("["):
        end = hostport.find("]")
        rest = hostport[end + 1 :] if end >= 0 else ""
        if end < 0 or not rest.startswith(":") or ":" in rest[1:]:
            return None
        return hostport[1:end]
    host, colon, _ = hostport.rpartition(":")
    if not colon or ":" in host or "[" in host or "]" in host:
        return None
    return host


def _ip_allowed(text: str) -> bool | None:
    # Loopback, private, unspecified: allowed. None when `text` is not an IP literal.
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_loopback or addr.is_unspecified:
        return True
    return any(addr.version == net.version and addr in net for net in _PRIVATE_NETS)


def host_verdict(host_header: str, *, method: str) -> Literal["pass", "preflight", "forbid"]:
    """Ollama's allowedHostsMiddleware for a request's Host header.

    A local IP passes; a local *name* passes too, except that an OPTIONS request to it is
    answered 204 on the spot ("preflight"); anything else is forbidden (403, no body).
    """
    host = split_host_port(host_header)
    if host is None:
        host = host_header
    if _ip_allowed(host):
        return "pass"
    host = host.lower()
    if host in ("", "localhost", _HOSTNAME) or host.endswith(_LOCAL_SUFFIXES):
        return "preflight" if method == "OPTIONS" else "pass"
    return "forbid"


@dataclasses.dataclass(frozen=True, slots=True)
class CorsVerdict:
    """What the CORS middleware does: nothing, refuse, answer a preflight, or add headers."""

    action: Literal["pass", "forbid", "preflight", "annotate"]
    headers: tuple[tuple[bytes, bytes], ...] = ()


_PASS: Final = CorsVerdict("pass")


def cors_verdict(*, origin: str, host: str, method: str) -> CorsVerdict:
    """gin-contrib/cors with Ollama's configuration (no OLLAMA_ORIGINS)."""
    if not origin or origin in (f"http://{host}", f"https://{host}"):
        return _PASS
    if origin not in _EXACT_ORIGINS and not origin.startswith(_ORIGIN_PREFIXES):
        return CorsVerdict("forbid")
    allow_origin = (b"access-control-allow-origin", origin.encode("latin-1", "replace"))
    if method == "OPTIONS":
        return CorsVerdict(
            "preflight",
            (
                (b"access-control-allow-headers", _ALLOW_HEADERS.encode()),
                (b"access-control-allow-methods", b"GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"),
                (b"access-control-max-age", b"43200"),
                (b"vary", b"Origin"),
                (b"vary", b"Access-Control-Request-Method"),
                (b"vary", b"Access-Control-Request-Headers"),
                allow_origin,
            ),
        )
    return CorsVerdict("annotate", ((b"vary", b"Origin"), allow_origin))

"""The baseline of the normalisation scenario (6): the gateway as it was before policyd wrote
the body Ollama receives.

- `create_app` serves policyd itself (same settings, stores, keys and Granian launch)
  whose decision serialises nothing and answers no `X-Nz-Upstream-Body`, so Caddy sends
  the client's bytes upstream. The rules that size the reservation still run: they
  are part of deciding, not of writing the body. The swap is made in this process only
  (a bench-only Granian worker); the policyd under test is never touched.
- `untouched_caddyfile` is the gateway's own Caddyfile without the upstream-body route:
  the header is not copied, `request_body set` is gone, nothing is stripped upstream.

So normalised minus untouched is everything normalisation costs per request: writing
the body in policyd, carrying it in a response header over the socket, Caddy copying it
onto the request and replacing the body with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from compose.local.services import REPO_ROOT
from policyd.authz import decision, normalise
from policyd.authz.app import create_app as create_policyd
from policyd.authz.fastpath import PolicyApp
from policyd.authz.screening import admit
from policyd.shared.contract import H_UPSTREAM_BODY

__all__ = ["create_app", "untouched_caddyfile"]

_CADDY_DIR: Final = REPO_ROOT / "caddy"
#: The route that sets the upstream body, from its comment to the header's removal.
_ROUTE_START: Final = "# Ollama receives the body policyd decided on"
_ROUTE_END: Final = f"\t\trequest_header -{H_UPSTREAM_BODY}\n"


def _no_body(body: dict[str, Any]) -> str:
    return ""


def _admit_without_body(*args: Any, **kwargs: Any) -> list[tuple[str, str]]:
    kwargs["upstream_body"] = None
    return admit(*args, **kwargs)


def create_app() -> PolicyApp:
    """policyd, deciding exactly as it does, minus writing the body for Ollama."""
    vars(normalise)["serialise"] = _no_body
    vars(decision)["admit"] = _admit_without_body
    return create_policyd()


def _cut_route(snippet: str) -> str:
    start = snippet.index(_ROUTE_START)
    line_start = snippet.rindex("\n", 0, start) + 1
    end = snippet.index(_ROUTE_END, start) + len(_ROUTE_END)
    return snippet[:line_start] + snippet[end:]


def _edit(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise ValueError(f"the gateway snippet changed: {old.strip()!r} is not there once")
    return text.replace(old, new)


def untouched_caddyfile(directory: Path) -> Path:
    """Write the gateway's Caddyfile and its snippet without the upstream-body route into
    `directory`; returns the Caddyfile's path."""
    snippet = (_CADDY_DIR / "gateway.caddy").read_text()
    snippet = _cut_route(snippet)
    snippet = _edit(snippet, f" {H_UPSTREAM_BODY} ", " ")
    snippet = _edit(snippet, f"\t\t\theader_up -{H_UPSTREAM_BODY}\n", "")
    if H_UPSTREAM_BODY in snippet:
        raise ValueError(f"the gateway snippet still names {H_UPSTREAM_BODY}")
    directory.mkdir(parents=True, exist_ok=True)
    for other in _CADDY_DIR.glob("*.caddy"):  # the other snippets the Caddyfile imports
        (directory / other.name).write_text(other.read_text())
    (directory / "gateway.caddy").write_text(snippet)
    caddyfile = directory / "Caddyfile"
    caddyfile.write_text((_CADDY_DIR / "Caddyfile").read_text())
    return caddyfile

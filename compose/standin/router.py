"""Route matching the way Ollama's gin engine (and Go's ServeMux in front of it) does it.

- Matching is on the *decoded*, case-sensitive path: `/api/%63hat` is chat, `/API/chat` is
  not found.
- A path that is right except for a trailing slash is redirected (301 for GET, 307 for
  every other method), but only if the route exists for the request's own method.
- A path served under other methods gets 405 with `Allow` listing them, in the order the
  methods were first registered (Ollama registers HEAD, GET, POST, DELETE).
- Before gin, ServeMux redirects paths with `//`, `/./` or `/../` to the clean path (301).
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Final, Literal

from compose.standin.exchange import Exchange

__all__ = [
    "Handler",
    "Match",
    "Router",
    "clean_path",
    "escaped_path",
    "redirect_target",
]

Handler = Callable[[Exchange, Mapping[str, str]], Awaitable[None]]

# Go's url.PathEscape-for-paths keeps these besides letters and digits.
_PATH_SAFE: Final = "-_.~$&+,/:;=@"
_PREFIX_UNSAFE: Final = re.compile(r"[^a-zA-Z0-9/-]+")
_REPEATED_SLASH: Final = re.compile(r"/{2,}")


@dataclasses.dataclass(frozen=True, slots=True)
class Match:
    """The router's verdict for one (method, path)."""

    kind: Literal["found", "redirect", "not_allowed", "not_found"]
    handler: Handler | None = None
    params: Mapping[str, str] = dataclasses.field(default_factory=dict)
    allow: tuple[str, ...] = ()


class _Tree:
    """The routes of one method: static paths plus `/prefix/:param` patterns."""

    def __init__(self) -> None:
        self.static: dict[str, Handler] = {}
        self.params: list[tuple[str, str, Handler]] = []  # (prefix incl. "/", name, handler)

    def add(self, pattern: str, handler: Handler) -> None:
        prefix, colon, name = pattern.rpartition("/:")
        if colon:
            self.params.append((prefix + "/", name, handler))
        else:
            self.static[pattern] = handler

    def get(self, path: str) -> tuple[Handler, dict[str, str]] | None:
        handler = self.static.get(path)
        if handler is not None:
            return handler, {}
        for prefix, name, param_handler in self.params:
            if path.startswith(prefix):
                value = path[len(prefix) :]
                if value and "/" not in value:
                    return param_handler, {name: value}
        return None


class Router:
    """gin's tree lookup, trailing-slash redirect and 405 handling, for a small route set."""

    def __init__(self) -> None:
        self._trees: dict[str, _Tree] = {}  # insertion order = gin's tree order

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        """Register `handler` for `method` on `pattern` (one `:param` segment at most)."""
        self._trees.setdefault(method, _Tree()).add(pattern, handler)

    def lookup(self, method: str, path: str) -> Match:
        """Find the handler, or say why there is none."""
        tree = self._trees.get(method)
        if tree is not None:
            found = tree.get(path)
            if found is not None:
                return Match("found", handler=found[0], params=found[1])
            if method != "CONNECT" and path != "/":
                other = path[:-1] if path.endswith("/") else path + "/"
                if tree.get(other) is not None:
                    return Match("redirect")
        allow = tuple(
            name
            for name, other_tree in self._trees.items()
            if name != method and other_tree.get(path) is not None
        )
        if allow:
            return Match("not_allowed", allow=allow)
        return Match("not_found")


def _go_clean(path: str) -> str:
    # Go's path.Clean: drop empty and "." segments, resolve "..", "." for nothing.
    if not path:
        return "."
    rooted = path.startswith("/")
    out: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if out and out[-1] != "..":
                out.pop()
            elif not rooted:
                out.append(segment)
            continue
        out.append(segment)
    joined = "/".join(out)
    if rooted:
        return "/" + joined
    return joined or "."


def clean_path(path: str) -> str:
    """ServeMux's cleanPath: the canonical form it redirects to (keeps a trailing slash)."""
    if not path:
        return "/"
    if not path.startswith("/"):
        path = "/" + path
    cleaned = _go_clean(path)
    if path.endswith("/") and cleaned != "/":
        cleaned += "/"
    return cleaned


def escaped_path(path: str) -> str:
    """How Go's URL.String() writes a decoded path (percent-encoding only what it must)."""
    return urllib.parse.quote(path, safe=_PATH_SAFE)


def redirect_target(exchange: Exchange) -> str:
    """gin's redirectTrailingSlash: the Location for a path that is off by a slash."""
    path = exchange.path
    prefix = _go_clean(exchange.header("x-forwarded-prefix"))
    if prefix != ".":
        prefix = _REPEATED_SLASH.sub("/", _PREFIX_UNSAFE.sub("", prefix))
        path = prefix + "/" + path
    target = path + "/"
    if len(path) > 1 and path.endswith("/"):
        target = path[:-1]
    location = escaped_path(target)
    return f"{location}?{exchange.query}" if exchange.query else location

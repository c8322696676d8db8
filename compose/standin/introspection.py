"""Test-only endpoints under `/__standin/` (never part of Ollama's API).

- `GET /__standin/requests`: JSON list of received requests, oldest first.
- `DELETE /__standin/requests`: forget them (204).
- `POST /__standin/fail` with optional `{"after_tokens": 3, "times": 1}`: the next
  `times` inference requests fail after that many tokens, the way Ollama reports a model
  failure (mid-stream error line; before the first token: status 500). 200 `{"pending": n}`.
- `DELETE /__standin/fail`: disarm (204).
- `GET /__standin/settings`: the timing and models this server runs with.
- `GET /__standin/runners`: per model, the load-affecting options its runner runs with,
  how often a runner was started (reloads included) and whether it is loaded now.

These bypass the Host check and are not recorded themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import msgspec

from compose.standin.exchange import JSON, TEXT, ASGISend
from compose.standin.gojson import encode
from compose.standin.state import ServerState

__all__ = ["PREFIX", "Introspection"]

PREFIX: Final = "/__standin/"

_Reply = tuple[int, bytes, list[tuple[bytes, bytes]]]


def _json(status: int, value: Any) -> _Reply:
    return status, encode(value), [(b"content-type", JSON)]


class Introspection:
    """Answers `/__standin/*` requests from the server state."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._routes: Final[dict[str, dict[str, Callable[[bytes], _Reply]]]] = {
            "/__standin/requests": {"GET": self._list, "DELETE": self._clear},
            "/__standin/fail": {"POST": self._arm, "DELETE": self._disarm},
            "/__standin/settings": {"GET": self._settings},
            "/__standin/runners": {"GET": self._runners},
        }

    def handles(self, path: str) -> bool:
        """Whether `path` is one of the introspection endpoints."""
        return path in self._routes

    async def answer(self, *, method: str, path: str, body: bytes, send: ASGISend) -> None:
        """Reply to an introspection request directly over ASGI."""
        methods = self._routes[path]
        action = methods.get(method)
        if action is None:
            allow = ", ".join(methods).encode()
            status, payload, headers = (
                405,
                b"405 method not allowed",
                [
                    (b"content-type", TEXT),
                    (b"allow", allow),
                ],
            )
        else:
            status, payload, headers = action(body)
        headers.append((b"content-length", str(len(payload)).encode()))
        await _send_all(send, status, headers, payload)

    def _list(self, body: bytes) -> _Reply:
        return _json(200, self._state.recorder.snapshot())

    def _clear(self, body: bytes) -> _Reply:
        self._state.recorder.clear()
        return 204, b"", []

    def _arm(self, body: bytes) -> _Reply:
        try:
            options = msgspec.json.decode(body) if body.strip() else {}
        except msgspec.DecodeError as exc:
            return _json(400, {"error": f"invalid JSON: {exc}"})
        if not isinstance(options, dict):
            return _json(400, {"error": "expected a JSON object"})
        after = options.get("after_tokens", 3)
        times = options.get("times", 1)
        valid = all(
            isinstance(value, int) and not isinstance(value, bool) for value in (after, times)
        )
        if not valid or after < 0 or times < 1:
            return _json(400, {"error": "after_tokens must be an integer >= 0, times >= 1"})
        pending = self._state.recorder.arm_failure(after_tokens=after, times=times)
        return _json(200, {"pending": pending})

    def _disarm(self, body: bytes) -> _Reply:
        self._state.recorder.disarm()
        return 204, b"", []

    def _runners(self, _body: bytes) -> _Reply:
        return _json(200, self._state.runners())

    def _settings(self, body: bytes) -> _Reply:
        settings = self._state.settings
        return _json(
            200,
            {
                "tokens_per_s": settings.tokens_per_s,
                "first_token_ms": settings.first_token_ms,
                "models": [card.name for card in self._state.catalogue.cards],
            },
        )


async def _send_all(
    send: ASGISend, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})

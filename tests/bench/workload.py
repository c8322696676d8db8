"""The requests the benchmark sends: tiny chats on both API surfaces, and streams."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Final

import attrs

from tests.bench.http1 import build_request
from tests.bench.rig import Target

__all__ = ["Workload"]

_MODEL: Final = "llama3.2"
_PROMPT: Final = [{"role": "user", "content": "Say hi."}]
#: Small replies: the benchmark is about the gateway, not about moving tokens.
_REPLY_TOKENS: Final = 8
#: The long conversation of scenario 3: 128 turns of ~500 characters.
_LONG_CHAT_TURNS: Final = 128
_TURN_TEXT: Final = "Turn {}: " + "a sentence of ordinary prose in a long conversation. " * 9


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@attrs.frozen(kw_only=True)
class Workload:
    """One API key and the request bodies every scenario shares."""

    key: str = attrs.field(repr=False)
    native: bytes = _json(
        {
            "model": _MODEL,
            "messages": _PROMPT,
            "stream": False,
            "options": {"num_predict": _REPLY_TOKENS},
        }
    )
    openai: bytes = _json({"model": _MODEL, "messages": _PROMPT, "max_tokens": _REPLY_TOKENS})

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}

    @staticmethod
    def long_chat(*, stream: bool | None = None, reply_tokens: int = 64) -> bytes:
        """A native chat carrying a long conversation (~64 KiB): policyd decodes and reads
        the whole body on every request, so this is where its cost grows. `stream` absent
        (None) leaves Ollama's default, a stream."""
        turns = [
            {"role": "user" if i % 2 == 0 else "assistant", "content": _TURN_TEXT.format(i)}
            for i in range(_LONG_CHAT_TURNS)
        ]
        body: dict[str, object] = {"model": _MODEL, "messages": turns}
        if stream is not None:
            body["stream"] = stream
        body["options"] = {"num_predict": reply_tokens}
        return _json(body)

    def small(self) -> list[tuple[str, str, bytes]]:
        """(method, path, body) of the two small non-streamed requests, used in turn."""
        return [("POST", "/api/chat", self.native), ("POST", "/v1/chat/completions", self.openai)]

    def small_requests(self, target: Target) -> list[bytes]:
        """The small requests as raw bytes for `target`."""
        host = f"{target.host}:{target.port}"
        return [
            build_request(method, path, host=host, headers=self.headers, body=body)
            for method, path, body in self.small()
        ]

    def stream_request(self, target: Target, *, tokens: int) -> bytes:
        """A streamed native chat of `tokens` tokens."""
        body = _json(
            {
                "model": _MODEL,
                "messages": [{"role": "user", "content": "Tell me a long story."}],
                "stream": True,
                "options": {"num_predict": tokens},
            }
        )
        host = f"{target.host}:{target.port}"
        return build_request("POST", "/api/chat", host=host, headers=self.headers, body=body)

    def authz_request(self, *, key: str | None = None, body: bytes | None = None) -> bytes:
        """What Caddy's forward_auth sends policyd for a native chat (the small one by default)."""
        return build_request(
            "GET",
            "/authz?",
            host="policyd",
            headers={
                "Authorization": f"Bearer {key or self.key}",
                "X-Forwarded-Method": "POST",
                "X-Forwarded-Uri": "/api/chat",
                "X-Nz-Body": base64.b64encode(self.native if body is None else body).decode(),
                # Admission refuses a repeated request id, as Caddy never sends one twice.
                "X-Request-Id": str(uuid.uuid4()),
            },
        )

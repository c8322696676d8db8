"""What the stand-in received, and failures armed for the next inference requests.

Tests read the log through `GET /__standin/requests` to prove what reached "Ollama" (and,
as important, what never did). The log is bounded so a long benchmark cannot exhaust
memory; the oldest entries go first.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Iterable
from typing import Any, Final

__all__ = ["DEFAULT_LIMIT", "Recorder", "RequestRecord"]

DEFAULT_LIMIT: Final = 10_000


#: Bytes of each body kept as text for `/__standin/requests`.
BODY_TEXT_LIMIT: Final = 4 * 1024 * 1024


@dataclasses.dataclass(slots=True, kw_only=True)
class RequestRecord:
    """One received request; the outcome fields fill in while it is being answered."""

    method: str
    raw_path: str
    path: str
    query: str
    headers: dict[str, str]
    body_sha256: str
    body_size: int
    #: The body as text (first `BODY_TEXT_LIMIT` bytes): what the gateway sent upstream.
    body: str
    request_id: str | None
    received_at: str
    status: int | None = None
    tokens_sent: int = 0
    disconnected: bool = False

    @classmethod
    def build(
        cls,
        *,
        method: str,
        raw_path: bytes,
        path: str,
        query: bytes,
        raw_headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        received_at: str,
    ) -> RequestRecord:
        """Record a request from its ASGI parts (repeated headers joined with ", ")."""
        headers: dict[str, str] = {}
        for raw_name, raw_value in raw_headers:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return cls(
            method=method,
            raw_path=raw_path.decode("latin-1"),
            path=path,
            query=query.decode("latin-1"),
            headers=headers,
            body_sha256=hashlib.sha256(body).hexdigest(),
            body_size=len(body),
            body=body[:BODY_TEXT_LIMIT].decode("utf-8", "replace"),
            request_id=headers.get("x-request-id"),
            received_at=received_at,
        )

    def as_json(self) -> dict[str, Any]:
        """The JSON object `GET /__standin/requests` lists."""
        return dataclasses.asdict(self)


class Recorder:
    """The bounded request log and the queue of armed failures."""

    def __init__(self, *, limit: int = DEFAULT_LIMIT) -> None:
        self._records: Final[collections.deque[RequestRecord]] = collections.deque(maxlen=limit)
        self._failures: Final[collections.deque[int]] = collections.deque()

    def add(self, record: RequestRecord) -> None:
        """Log a request as it arrives."""
        self._records.append(record)

    def snapshot(self) -> list[dict[str, Any]]:
        """Every logged request, oldest first."""
        return [record.as_json() for record in self._records]

    def clear(self) -> None:
        """Forget the log (armed failures stay armed)."""
        self._records.clear()

    def arm_failure(self, *, after_tokens: int, times: int) -> int:
        """Make the next `times` inference requests fail after `after_tokens` tokens."""
        self._failures.extend([after_tokens] * times)
        return len(self._failures)

    def disarm(self) -> None:
        """Drop every armed failure."""
        self._failures.clear()

    def take_failure(self) -> int | None:
        """Claim one armed failure for the inference request starting now, if any."""
        return self._failures.popleft() if self._failures else None

    @property
    def pending_failures(self) -> int:
        """How many armed failures are left."""
        return len(self._failures)

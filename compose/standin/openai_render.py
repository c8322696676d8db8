"""The bytes of Ollama's OpenAI-compatible replies: objects, SSE chunks and errors.

Chunks are assembled from pre-encoded pieces: they go out once per token, and a fresh
`json.Marshal` of a dict per token would be the stand-in's largest cost.
"""

from __future__ import annotations

import abc
import random
import time
from typing import Any, ClassVar, Final

from compose.standin.exchange import JSON, SSE
from compose.standin.gojson import encode
from compose.standin.inference import Generation, Job

__all__ = ["ChatRenderer", "CompletionRenderer", "openai_error"]

_FINGERPRINT: Final = b',"system_fingerprint":"fp_ollama"'
_DONE: Final = b"data: [DONE]\n\n"
_ZERO_USAGE: Final = b',"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}'


def openai_error(status: int, message: str) -> bytes:
    """`openai.NewError`: the error type follows the status."""
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return encode({"error": {"message": message, "type": kind, "param": None, "code": None}})


def _usage(prompt: int, completion: int) -> bytes:
    return encode(
        {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
    )


class _OpenAIRenderer(abc.ABC):
    """What both OpenAI surfaces share: the reply's id, token encodings, whole objects, errors."""

    stream_content_type = SSE
    #: The reply id's prefix and the `object` of a non-streamed reply.
    _ID_PREFIX: ClassVar[str]
    _OBJECT: ClassVar[str]

    def __init__(self, job: Job, *, stream: bool, include_usage: bool) -> None:
        self._job = job
        self._stream = stream
        self._include_usage = include_usage
        self._id = f"{self._ID_PREFIX}-{random.randrange(999)}"
        self._created = int(time.time())
        self._tokens = job.reply.encoded if job.reply is not None else ()

    @abc.abstractmethod
    def _choice(self, text: str, reason: str) -> dict[str, Any]:
        """The single `choices` entry of a non-streamed reply."""

    def _completion(self, text: str, reason: str, completion_tokens: int) -> bytes:
        # json.Encoder's line, with `usage` (always there when not streamed) last.
        body = {
            "id": self._id,
            "object": self._OBJECT,
            "created": int(time.time()),
            "model": self._job.requested,
            "system_fingerprint": "fp_ollama",
            "choices": [self._choice(text, reason)],
        }
        usage = _usage(self._job.prompt_tokens, completion_tokens)
        return encode(body)[:-1] + b',"usage":' + usage + b"}\n"

    def whole(self, generation: Generation) -> tuple[bytes, bytes]:
        """(content type, body) of the non-streamed reply."""
        text = "".join(self._job.text_tokens)
        return JSON, self._completion(text, self._job.done_reason, generation.emitted)

    def error(self, status: int, message: str, *, streaming: bool) -> tuple[bytes, bytes]:
        """(content type, body) of an error, as the OpenAI writer sends it."""
        return JSON, openai_error(status, message) + b"\n"


def _event_head(fields: dict[str, Any]) -> bytes:
    # `data: ` and the fields every event of a reply starts with, the object left open.
    return b"data: " + encode(fields)[:-1]


class ChatRenderer(_OpenAIRenderer):
    """chat.completion objects and chat.completion.chunk events."""

    _ID_PREFIX = "chatcmpl"
    _OBJECT = "chat.completion"

    def __init__(self, job: Job, *, stream: bool, include_usage: bool) -> None:
        super().__init__(job, stream=stream, include_usage=include_usage)
        self._head = _event_head(
            {
                "id": self._id,
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": job.requested,
                "system_fingerprint": "fp_ollama",
            }
        )

    def chunk(self, index: int) -> bytes:
        # Only the first delta names the role (as in the fact sheet's sequence).
        role = b'"role":"assistant",' if index == 0 else b""
        return (
            self._head
            + b',"choices":[{"index":0,"delta":{'
            + role
            + b'"content":'
            + self._tokens[index]
            + b'},"finish_reason":null}]}\n\n'
        )

    def stream_tail(self, generation: Generation) -> bytes:
        reason = encode(self._job.done_reason)
        out = (
            self._head + b',"choices":[{"index":0,"delta":{},"finish_reason":' + reason + b"}]}\n\n"
        )
        if self._include_usage:
            usage = _usage(self._job.prompt_tokens, generation.emitted)
            out += self._head + b',"choices":[],"usage":' + usage + b"}\n\n"
        return out + _DONE

    def midstream_error(self) -> bytes:
        # The error line decodes as an empty chat response: an empty delta, no [DONE].
        return self._head + b',"choices":[{"index":0,"delta":{},"finish_reason":null}]}\n\n'

    def _choice(self, text: str, reason: str) -> dict[str, Any]:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": reason,
        }

    def preload(self) -> tuple[bytes, bytes]:
        return JSON, self._completion("", self._job.preload or "load", 0)


class CompletionRenderer(_OpenAIRenderer):
    """text_completion objects and events (every event carries a zero usage if asked)."""

    _ID_PREFIX = "cmpl"
    _OBJECT = "text_completion"

    def __init__(self, job: Job, *, stream: bool, include_usage: bool) -> None:
        super().__init__(job, stream=stream, include_usage=include_usage)
        self._head = _event_head(
            {"id": self._id, "object": "text_completion", "created": self._created}
        )
        self._tail = b',"model":' + encode(job.requested) + _FINGERPRINT
        if include_usage:
            self._tail += _ZERO_USAGE
        self._tail += b"}\n\n"

    def _event(self, text: bytes, reason: bytes) -> bytes:
        return (
            self._head
            + b',"choices":[{"text":'
            + text
            + b',"index":0,"finish_reason":'
            + reason
            + b"}]"
            + self._tail
        )

    def chunk(self, index: int) -> bytes:
        return self._event(self._tokens[index], b"null")

    def _ending(self, reason: str, completion_tokens: int) -> bytes:
        out = self._event(b'""', encode(reason))
        if self._include_usage:
            usage = _usage(self._job.prompt_tokens, completion_tokens)
            out += (
                self._head
                + b',"choices":[],"model":'
                + encode(self._job.requested)
                + _FINGERPRINT
                + b',"usage":'
                + usage
                + b"}\n\n"
            )
        return out + _DONE

    def stream_tail(self, generation: Generation) -> bytes:
        return self._ending(self._job.done_reason, generation.emitted)

    def midstream_error(self) -> bytes:
        return self._event(b'""', b"null")

    def _choice(self, text: str, reason: str) -> dict[str, Any]:
        return {"text": text, "index": 0, "finish_reason": reason}

    def preload(self) -> tuple[bytes, bytes]:
        # An empty prompt: Ollama's load answer passed through the completion writer.
        reason = self._job.preload or "load"
        if self._stream:
            return SSE, self._ending(reason, 0)
        return JSON, self._completion("", reason, 0)

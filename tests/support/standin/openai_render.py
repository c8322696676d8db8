"""The bytes of Ollama's OpenAI-compatible replies: objects, SSE chunks and errors.

Chunks are assembled from pre-encoded pieces: they go out once per token, and a fresh
`json.Marshal` of a dict per token would be the stand-in's largest cost.
"""

from __future__ import annotations

import random
import time
from typing import Final

from tests.support.standin.exchange import JSON, SSE
from tests.support.standin.gojson import encode
from tests.support.standin.inference import Generation, Job

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


class ChatRenderer:
    """chat.completion objects and chat.completion.chunk events."""

    stream_content_type = SSE

    def __init__(self, job: Job, *, stream: bool, include_usage: bool) -> None:
        self._job = job
        self._stream = stream
        self._include_usage = include_usage
        self._id = f"chatcmpl-{random.randrange(999)}"
        self._created = int(time.time())
        head = encode(
            {
                "id": self._id,
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": job.requested,
                "system_fingerprint": "fp_ollama",
            }
        )
        self._head = b"data: " + head[:-1]
        self._tokens = job.reply.encoded if job.reply is not None else ()

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

    def _completion(self, content: str, reason: str, completion_tokens: int) -> bytes:
        body = {
            "id": self._id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self._job.requested,
            "system_fingerprint": "fp_ollama",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": reason,
                }
            ],
        }
        usage = _usage(self._job.prompt_tokens, completion_tokens)
        return encode(body)[:-1] + b',"usage":' + usage + b"}\n"

    def whole(self, generation: Generation) -> tuple[bytes, bytes]:
        text = "".join(self._job.text_tokens)
        return JSON, self._completion(text, self._job.done_reason, generation.emitted)

    def error(self, status: int, message: str, *, streaming: bool) -> tuple[bytes, bytes]:
        return JSON, openai_error(status, message) + b"\n"

    def preload(self) -> tuple[bytes, bytes]:
        return JSON, self._completion("", self._job.preload or "load", 0)


class CompletionRenderer:
    """text_completion objects and events (every event carries a zero usage if asked)."""

    stream_content_type = SSE

    def __init__(self, job: Job, *, stream: bool, include_usage: bool) -> None:
        self._job = job
        self._stream = stream
        self._include_usage = include_usage
        self._id = f"cmpl-{random.randrange(999)}"
        self._created = int(time.time())
        head = encode({"id": self._id, "object": "text_completion", "created": self._created})
        self._head = b"data: " + head[:-1]
        self._tail = b',"model":' + encode(job.requested) + _FINGERPRINT
        if include_usage:
            self._tail += _ZERO_USAGE
        self._tail += b"}\n\n"
        self._tokens = job.reply.encoded if job.reply is not None else ()

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

    def _completion(self, text: str, reason: str, completion_tokens: int) -> bytes:
        body = {
            "id": self._id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self._job.requested,
            "system_fingerprint": "fp_ollama",
            "choices": [{"text": text, "index": 0, "finish_reason": reason}],
        }
        usage = _usage(self._job.prompt_tokens, completion_tokens)
        return encode(body)[:-1] + b',"usage":' + usage + b"}\n"

    def whole(self, generation: Generation) -> tuple[bytes, bytes]:
        text = "".join(self._job.text_tokens)
        return JSON, self._completion(text, self._job.done_reason, generation.emitted)

    def error(self, status: int, message: str, *, streaming: bool) -> tuple[bytes, bytes]:
        return JSON, openai_error(status, message) + b"\n"

    def preload(self) -> tuple[bytes, bytes]:
        # An empty prompt: Ollama's load answer passed through the completion writer.
        reason = self._job.preload or "load"
        if self._stream:
            return SSE, self._ending(reason, 0)
        return JSON, self._completion("", reason, 0)

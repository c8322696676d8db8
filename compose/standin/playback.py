"""Playing a prepared job to the client, whatever the wire format.

The sequence is Ollama's: headers go out with the first token (so a failure before it can
still change the status), one chunk per token, then the final chunk(s). A `Renderer`
supplies the bytes for one surface (native NDJSON or OpenAI SSE).
"""

from __future__ import annotations

from typing import Protocol

from compose.standin.exchange import Exchange
from compose.standin.inference import MIDSTREAM_ERROR, Generation, Job
from compose.standin.state import ServerState

__all__ = ["Renderer", "play"]


class Renderer(Protocol):
    """The bytes one surface sends for a job."""

    stream_content_type: bytes

    def chunk(self, index: int) -> bytes:
        """The streamed chunk carrying token `index`."""
        ...

    def stream_tail(self, generation: Generation) -> bytes:
        """Everything after the last token: final chunk(s), usage, terminator."""
        ...

    def midstream_error(self) -> bytes:
        """What the client sees when the model fails after the first chunk."""
        ...

    def whole(self, generation: Generation) -> tuple[bytes, bytes]:
        """(content type, body) of the non-streamed reply."""
        ...

    def error(self, status: int, message: str, *, streaming: bool) -> tuple[bytes, bytes]:
        """(content type, body) of an error answered before anything was written."""
        ...

    def preload(self) -> tuple[bytes, bytes]:
        """(content type, body) for an empty prompt: the load/unload answer."""
        ...


async def _stream(exchange: Exchange, renderer: Renderer, generation: Generation) -> None:
    async for index in generation.tokens():
        data = renderer.chunk(index)
        if not exchange.started:
            await exchange.start_stream(200, content_type=renderer.stream_content_type)
        await exchange.write(data)
        exchange.record.tokens_sent += 1
    if generation.failed:
        if exchange.started:
            await exchange.end_stream(renderer.midstream_error())
        else:
            content_type, body = renderer.error(500, MIDSTREAM_ERROR, streaming=True)
            await exchange.respond(500, body, content_type=content_type)
        return
    tail = renderer.stream_tail(generation)
    if not exchange.started:
        await exchange.start_stream(200, content_type=renderer.stream_content_type)
    await exchange.end_stream(tail)


async def _whole(exchange: Exchange, renderer: Renderer, generation: Generation) -> None:
    await generation.run()
    if generation.failed:
        content_type, body = renderer.error(500, MIDSTREAM_ERROR, streaming=False)
        await exchange.respond(500, body, content_type=content_type)
        return
    content_type, body = renderer.whole(generation)
    exchange.record.tokens_sent = generation.emitted
    await exchange.respond(200, body, content_type=content_type)


async def play(exchange: Exchange, state: ServerState, job: Job, renderer: Renderer) -> None:
    """Answer `job`: preload reply, streamed chunks or one body; stops if the client leaves."""
    if job.preload is not None:
        if job.preload == "unload":
            state.unload(job.card)
        else:
            state.use(job.card, job.runner)
            state.touch(job.card, keep_alive_s=job.keep_alive_s)
        content_type, body = renderer.preload()
        await exchange.respond(200, body, content_type=content_type)
        return
    state.use(job.card, job.runner)
    generation = Generation(
        job,
        settings=state.settings,
        received_ns=exchange.received_ns,
        fail_after=state.recorder.take_failure(),
    )
    work = _stream if job.stream else _whole
    await exchange.unless_disconnected(work(exchange, renderer, generation))
    state.touch(job.card, keep_alive_s=job.keep_alive_s)

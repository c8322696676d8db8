"""The model side of generate/chat, shared by the native and OpenAI surfaces.

`prepare_*` do what Ollama's GenerateHandler/ChatHandler check before inference, in the
same order, and return either a `Refusal` (status + Ollama's message) or a `Job`. A
`Generation` then plays the job out on the clock: first token after `first_token_ms`,
then one token every 1/`tokens_per_s` seconds on a fixed monotonic schedule (so the pace
does not drift with event-loop jitter), stopping early where a failure was armed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Final, Literal

from compose.standin.gojson import BindError, go_duration_seconds, go_quote
from compose.standin.models import ModelCard, canonical_name
from compose.standin.settings import StandinSettings
from compose.standin.state import ServerState
from compose.standin.textgen import Reply, reply_for
from compose.standin.tokenizer import ChatTurn, count_tokens, render_chat, render_generate

__all__ = [
    "MIDSTREAM_ERROR",
    "Generation",
    "Job",
    "Refusal",
    "output_bound",
    "prepare_chat",
    "prepare_generate",
    "runner_context",
    "runner_options",
]

#: Options that decide how a runner is loaded (`api/types.go` Runner): a request whose
#: values differ from the loaded runner's makes Ollama reload it (`server/sched.go:
#: needsReload`). num_ctx is one of them.
RUNNER_OPTIONS: Final = frozenset(
    ("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap", "use_mlock", "numa")
)
#: Ollama's default context window when a request names none: the server's default
#: (`server/routes.go` Serve: 4096 below 23 GiB of VRAM, unless OLLAMA_CONTEXT_LENGTH).
DEFAULT_NUM_CTX: Final = 4096
#: The smallest window a runner is given (`server/sched.go`, Scheduler.getRunner).
MIN_NUM_CTX: Final = 4
#: Context windows an open-ended generation may fill (`llm/llama_server.go`,
#: openEndedGenerationContextMultiplier).
OPEN_ENDED_WINDOWS: Final = 10
#: Prompt tokens one image costs (a CLIP-style 24x24 patch grid, as llava's projector).
IMAGE_TOKENS: Final = 576

#: What Ollama streams when the runner fails after the first chunk went out.
MIDSTREAM_ERROR: Final = "an error was encountered while running the model"

_INTEGER_OPTIONS: Final = "num_keep seed num_predict top_k repeat_last_n num_ctx num_batch"
_FLOAT_OPTIONS: Final = "top_p min_p typical_p temperature repeat_penalty presence_penalty"
#: Option types Options.FromMap enforces (unknown options are ignored, as in Ollama).
_OPTION_KINDS: Final = {
    **dict.fromkeys([*_INTEGER_OPTIONS.split(), "num_gpu", "main_gpu", "num_thread"], "integer"),
    **dict.fromkeys([*_FLOAT_OPTIONS.split(), "frequency_penalty"], "float32"),
    **dict.fromkeys(("numa", "use_mmap", "low_vram", "vocab_only", "use_mlock"), "boolean"),
    "stop": "array",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """An error answer: HTTP status and Ollama's message."""

    status: int
    message: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    """A request that passed Ollama's checks: what to answer and how."""

    requested: str  # the model as the client spelled it (echoed in replies)
    card: ModelCard
    stream: bool
    keep_alive_s: float | None
    preload: Literal["load", "unload"] | None = None
    prompt_text: str = ""
    prompt_tokens: int = 0
    reply: Reply | None = None
    limit: int = 0  # tokens to produce
    done_reason: str = "stop"
    context: tuple[int, ...] = ()  # generate only: the request's context ids
    #: The load-affecting options the request's runner needs.
    runner: tuple[tuple[str, object], ...] = ()

    @property
    def text_tokens(self) -> tuple[str, ...]:
        """The tokens this job produces, cut at the limit."""
        return () if self.reply is None else self.reply.tokens[: self.limit]


def _stream_flag(fields: Mapping[str, Any]) -> bool:
    # Native: absent or null streams; only an explicit false turns it off.
    return fields.get("stream") is not False


def runner_options(options: Any) -> tuple[tuple[str, object], ...]:
    """The load-affecting options a request names, as a comparable value."""
    if not isinstance(options, dict):
        return ()
    return tuple(sorted((k, v) for k, v in options.items() if k in RUNNER_OPTIONS))


def runner_context(card: ModelCard, options: Any) -> int:
    """The context window of the runner that serves the request, sized as Ollama 0.32.15 does.

    A named num_ctx (a float truncated, as `api/types.go` Options.FromMap does; 0 and
    negatives included), else the server default (`server/routes.go` modelOptions); then
    at least MIN_NUM_CTX (`server/sched.go` getRunner) and at most the model's training
    context (`llm/server.go` NewLlamaServer).
    """
    num_ctx = options.get("num_ctx") if isinstance(options, dict) else None
    window = DEFAULT_NUM_CTX
    if isinstance(num_ctx, int | float) and not isinstance(num_ctx, bool):
        window = max(int(num_ctx), MIN_NUM_CTX)
    return min(window, card.context_length) if card.context_length > 0 else window


def output_bound(num_predict: int, window: int) -> int | None:
    """The most tokens Ollama lets a generation produce; None when Ollama sets no bound.

    Modelled on `llm/llama_server.go` boundedNumPredict, which llamaServerRunner's
    Completion and Chat apply: a negative num_predict (-1, the default; -2 is not special)
    or one above ten windows becomes ten windows. 0 passes through unchanged, and the
    completion request to llama-server omits it (`n_predict,omitempty`), so generation
    runs to a stop token or stop sequence. (A model chatting through llama-server's own
    template gets `n_predict: 0` sent as is; the stand-in models the Ollama-rendered
    path every generate and most chats take.) Context shift is on by default
    (`server/sched.go` resolveContextShift), so filling the window does not end a
    generation; `shift: false`, under which it would, is not modelled.
    """
    if num_predict == 0:
        return None
    limit = OPEN_ENDED_WINDOWS * window
    return limit if num_predict < 0 or num_predict > limit else num_predict


def _extra_prompt_tokens(fields: Mapping[str, Any]) -> int:
    """Tokens Ollama adds to the prompt besides the text: images and tool definitions."""
    images = fields.get("images")
    count = len(images) if isinstance(images, list) else 0
    messages = fields.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                found = message.get("images")
                count += len(found) if isinstance(found, list) else 0
                content = message.get("content")
                if isinstance(content, list):
                    count += sum(
                        1
                        for part in content
                        if isinstance(part, dict) and part.get("type") == "image_url"
                    )
    tools = fields.get("tools")
    tool_tokens = count_tokens(json.dumps(tools)) if tools else 0
    return count * IMAGE_TOKENS + tool_tokens


def _check_options(options: Any) -> Refusal | int:
    """Validate option types as Ollama's Options.FromMap does; return num_predict."""
    if not isinstance(options, dict):
        return -1
    for key, value in options.items():
        kind = _OPTION_KINDS.get(key)
        if kind is None or value is None:
            continue
        ok = {
            "integer": isinstance(value, int | float) and not isinstance(value, bool),
            "float32": isinstance(value, float | int) and not isinstance(value, bool),
            "boolean": isinstance(value, bool),
            "array": isinstance(value, list),
        }[kind]
        if not ok:
            return Refusal(500, f"option {go_quote(key)} must be of type {kind}")
    num_predict = options.get("num_predict")
    return int(num_predict) if isinstance(num_predict, int | float) else -1


def _capability_refusal(
    requested: str, card: ModelCard, needed: Sequence[tuple[str, str]]
) -> Refusal | None:
    for capability, verb in needed:
        if not card.supports(capability):
            return Refusal(400, f"{go_quote(requested)} does not support {verb}")
    return None


def _thinking_requested(think: Any) -> bool:
    return think is True or (isinstance(think, str) and think not in ("", "none"))


def _keep_alive(fields: Mapping[str, Any]) -> float | Refusal | None:
    try:
        return go_duration_seconds(fields.get("keep_alive"))
    except BindError as exc:
        return Refusal(400, str(exc))


def _job(
    *,
    requested: str,
    card: ModelCard,
    fields: Mapping[str, Any],
    keep_alive_s: float | None,
    prompt_text: str,
    num_predict: int,
    context: tuple[int, ...],
) -> Job:
    json_format = fields.get("format") not in (None, "")
    reply = reply_for(card.name, prompt_text, json_format=json_format)
    full = len(reply.tokens)
    bound = output_bound(num_predict, runner_context(card, fields.get("options")))
    limit = full if bound is None else min(bound, full)
    return Job(
        requested=requested,
        card=card,
        stream=_stream_flag(fields),
        keep_alive_s=keep_alive_s,
        prompt_text=prompt_text,
        # Context ids are tokens already: they count without being rendered; so do images
        # and tool definitions, which the template and projector add.
        prompt_tokens=count_tokens(prompt_text) + len(context) + _extra_prompt_tokens(fields),
        reply=reply,
        limit=limit,
        done_reason="length" if limit < full else "stop",
        context=context,
        runner=runner_options(fields.get("options")),
    )


def _prepare(
    state: ServerState,
    fields: Mapping[str, Any],
    *,
    requested: str,
    has_input: bool,
    needed: Sequence[tuple[str, str]],
    render: Callable[[], str],
    context: tuple[int, ...] = (),
) -> Job | Refusal:
    """The checks generate and chat share once the model name parses, in Ollama's order.

    Without input (no prompt, no messages) the job is a preload: an unload with
    `keep_alive: 0`, which skips the capability and option checks, else a load, which
    does not. `needed` lists the endpoint's capabilities (with the word Ollama's refusal
    uses); thinking is checked after them when `think` asks for it. `render` makes the
    prompt text, only for a request that passed every check.
    """
    card = state.catalogue.find(requested)
    if card is None:
        return Refusal(404, f"model '{requested}' not found")
    keep_alive = _keep_alive(fields)
    if isinstance(keep_alive, Refusal):
        return keep_alive
    if not has_input and keep_alive == 0:
        return Job(requested=requested, card=card, stream=False, keep_alive_s=0, preload="unload")
    if _thinking_requested(fields.get("think")):
        needed = [*needed, ("thinking", "thinking")]
    refusal = _capability_refusal(requested, card, needed)
    if refusal is not None:
        return refusal
    num_predict = _check_options(fields.get("options"))
    if isinstance(num_predict, Refusal):
        return num_predict
    if not has_input:
        return Job(
            requested=requested,
            card=card,
            stream=False,
            keep_alive_s=keep_alive,
            preload="load",
            runner=runner_options(fields.get("options")),
        )
    return _job(
        requested=requested,
        card=card,
        fields=fields,
        keep_alive_s=keep_alive,
        prompt_text=render(),
        num_predict=num_predict,
        context=context,
    )


def prepare_generate(state: ServerState, fields: Mapping[str, Any]) -> Job | Refusal:
    """GenerateHandler's checks for bound `api.GenerateRequest` fields."""
    requested: str = fields.get("model") or ""
    if canonical_name(requested) is None:
        return Refusal(404, f"model '{requested}' not found")
    context = tuple(fields.get("context") or ())
    if fields.get("raw") and (fields.get("template") or fields.get("system") or context):
        return Refusal(400, "raw mode does not support template, system, or context")
    prompt: str = fields.get("prompt") or ""
    needed = [("completion", "generate")]
    if fields.get("suffix"):
        needed.append(("insert", "insert"))
    return _prepare(
        state,
        fields,
        requested=requested,
        has_input=bool(prompt),
        needed=needed,
        render=lambda: render_generate(
            prompt,
            system=fields.get("system") or "",
            suffix=fields.get("suffix") or "",
            raw=bool(fields.get("raw")),
        ),
        context=context,
    )


def prepare_chat(
    state: ServerState, fields: Mapping[str, Any], turns: Sequence[ChatTurn]
) -> Job | Refusal:
    """ChatHandler's checks for bound `api.ChatRequest` fields and its messages."""
    requested: str = fields.get("model") or ""
    if canonical_name(requested) is None:
        return Refusal(400, "model is required")
    needed = [("completion", "chat")]
    if fields.get("tools"):
        needed.append(("tools", "tools"))
    return _prepare(
        state,
        fields,
        requested=requested,
        has_input=bool(turns),
        needed=needed,
        render=lambda: render_chat(turns),
    )


class Generation:
    """One job played out on the clock; knows how many tokens went out and how long it took.

    `fail_after` (from /__standin/fail) stops it after that many tokens, with `failed` set.
    """

    def __init__(
        self,
        job: Job,
        *,
        settings: StandinSettings,
        received_ns: int,
        fail_after: int | None,
    ) -> None:
        self.job: Final = job
        self.failed: Final = fail_after is not None
        self.count: Final = job.limit if fail_after is None else min(fail_after, job.limit)
        self.emitted = 0
        self._interval: Final = settings.token_interval_s
        self._received_ns: Final = received_ns
        self._load_end_ns: Final = time.monotonic_ns()
        self._first_s: Final = time.monotonic() + settings.first_token_s
        self._first_ns = 0
        self._done_ns = 0

    async def _sleep_until(self, deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def tokens(self) -> AsyncIterator[int]:
        """Yield token indexes 0..count-1, each at its scheduled time."""
        for index in range(self.count):
            await self._sleep_until(self._first_s + index * self._interval)
            if index == 0:
                self._first_ns = time.monotonic_ns()
            yield index
            self.emitted = index + 1
        self._done_ns = time.monotonic_ns()

    async def run(self) -> None:
        """Wait as long as streaming every token would take (the non-streamed case)."""
        if self.count:
            await self._sleep_until(self._first_s)
            self._first_ns = time.monotonic_ns()
            await self._sleep_until(self._first_s + (self.count - 1) * self._interval)
        self.emitted = self.count
        self._done_ns = time.monotonic_ns()

    def metrics(self) -> dict[str, int]:
        """Ollama's Metrics fields in order; zero values left out (`omitempty`)."""
        done = self._done_ns or time.monotonic_ns()
        interval_ns = int(self._interval * 1e9)
        first = self._first_ns or done
        # The first token's own compute belongs to eval, the wait before it to prompt eval.
        eval_start = max(first - interval_ns, self._load_end_ns + 1)
        values = {
            "total_duration": max(done - self._received_ns, 1),
            "load_duration": max(self._load_end_ns - self._received_ns, 1),
            "prompt_eval_count": self.job.prompt_tokens,
            "prompt_eval_duration": max(eval_start - self._load_end_ns, 1),
            "eval_count": self.emitted,
            "eval_duration": max(done - eval_start, 1) if self.emitted else 0,
        }
        return {name: value for name, value in values.items() if value}

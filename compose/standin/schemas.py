"""The Go request structs Ollama binds bodies into, as far as binding can tell them apart.

Only the fields matter here, with the Go types that decide type errors; fields bound into
`any`/`json.RawMessage` accept every JSON value. Custom unmarshalers (`keep_alive`,
`think`, `format`) are `ANY` here and checked by the handlers.
"""

from __future__ import annotations

from typing import Final

from compose.standin.gojson import (
    ANY,
    BOOL,
    FLOAT32,
    FLOAT64,
    INT,
    MAP,
    STRING,
    array,
    struct,
)

__all__ = [
    "CHAT_REQUEST",
    "COPY_REQUEST",
    "CREATE_REQUEST",
    "DELETE_REQUEST",
    "EMBEDDING_REQUEST",
    "EMBED_REQUEST",
    "GENERATE_REQUEST",
    "OPENAI_CHAT_REQUEST",
    "OPENAI_COMPLETION_REQUEST",
    "OPENAI_EMBED_REQUEST",
    "PULL_REQUEST",
    "PUSH_REQUEST",
    "SHOW_REQUEST",
]

_IMAGES: Final = array(STRING, "[]api.ImageData")

_MESSAGE: Final = struct(
    "api.Message",
    {
        "role": STRING,
        "content": STRING,
        "thinking": STRING,
        "images": _IMAGES,
        "tool_calls": array(ANY, "[]api.ToolCall"),
        "tool_name": STRING,
        "tool_call_id": STRING,
    },
)

GENERATE_REQUEST: Final = struct(
    "api.GenerateRequest",
    {
        "model": STRING,
        "prompt": STRING,
        "suffix": STRING,
        "system": STRING,
        "template": STRING,
        "context": array(INT),
        "stream": BOOL,
        "raw": BOOL,
        "format": ANY,
        "keep_alive": ANY,
        "images": _IMAGES,
        "options": MAP,
        "think": ANY,
        "truncate": BOOL,
        "shift": BOOL,
        "logprobs": BOOL,
        "top_logprobs": INT,
    },
)

CHAT_REQUEST: Final = struct(
    "api.ChatRequest",
    {
        "model": STRING,
        "messages": array(_MESSAGE),
        "stream": BOOL,
        "format": ANY,
        "keep_alive": ANY,
        "tools": array(ANY, "api.Tools"),
        "options": MAP,
        "think": ANY,
        "truncate": BOOL,
        "shift": BOOL,
        "logprobs": BOOL,
        "top_logprobs": INT,
    },
)

EMBED_REQUEST: Final = struct(
    "api.EmbedRequest",
    {
        "model": STRING,
        "input": ANY,
        "keep_alive": ANY,
        "truncate": BOOL,
        "dimensions": INT,
        "options": MAP,
    },
)

EMBEDDING_REQUEST: Final = struct(
    "api.EmbeddingRequest",
    {"model": STRING, "prompt": STRING, "keep_alive": ANY, "options": MAP},
)

SHOW_REQUEST: Final = struct(
    "api.ShowRequest",
    {
        "model": STRING,
        "system": STRING,
        "template": STRING,
        "verbose": BOOL,
        "options": MAP,
        "name": STRING,
    },
)

PULL_REQUEST: Final = struct(
    "api.PullRequest",
    {
        "model": STRING,
        "insecure": BOOL,
        "username": STRING,
        "password": STRING,
        "stream": BOOL,
        "name": STRING,
    },
)

PUSH_REQUEST: Final = struct(
    "api.PushRequest",
    {
        "model": STRING,
        "insecure": BOOL,
        "username": STRING,
        "password": STRING,
        "stream": BOOL,
        "name": STRING,
    },
)

CREATE_REQUEST: Final = struct(
    "api.CreateRequest",
    {
        "model": STRING,
        "stream": BOOL,
        "quantize": STRING,
        "from": STRING,
        "files": MAP,
        "adapters": MAP,
        "template": STRING,
        "license": ANY,
        "system": STRING,
        "parameters": MAP,
        "messages": array(_MESSAGE),
        "name": STRING,
    },
)

COPY_REQUEST: Final = struct("api.CopyRequest", {"source": STRING, "destination": STRING})

DELETE_REQUEST: Final = struct("api.DeleteRequest", {"model": STRING, "name": STRING})

_OPENAI_MESSAGE: Final = struct(
    "openai.Message",
    {
        "role": STRING,
        "content": ANY,
        "reasoning": STRING,
        "tool_calls": array(ANY, "[]openai.ToolCall"),
        "name": STRING,
        "tool_call_id": STRING,
    },
)

_STREAM_OPTIONS: Final = struct("openai.StreamOptions", {"include_usage": BOOL})

OPENAI_CHAT_REQUEST: Final = struct(
    "openai.ChatCompletionRequest",
    {
        "model": STRING,
        "messages": array(_OPENAI_MESSAGE),
        "stream": BOOL,
        "stream_options": _STREAM_OPTIONS,
        "max_tokens": INT,
        "seed": INT,
        "stop": ANY,
        "temperature": FLOAT64,
        "frequency_penalty": FLOAT64,
        "presence_penalty": FLOAT64,
        "top_p": FLOAT64,
        "response_format": struct(
            "openai.ResponseFormat",
            {"type": STRING, "json_schema": struct("openai.JsonSchema", {"schema": ANY})},
        ),
        "tools": array(ANY, "[]api.Tool"),
        "reasoning": struct("openai.Reasoning", {"effort": STRING}),
        "reasoning_effort": STRING,
        "logprobs": BOOL,
        "top_logprobs": INT,
    },
)

OPENAI_COMPLETION_REQUEST: Final = struct(
    "openai.CompletionRequest",
    {
        "model": STRING,
        "prompt": STRING,
        "frequency_penalty": FLOAT32,
        "max_tokens": INT,
        "presence_penalty": FLOAT32,
        "seed": INT,
        "stop": ANY,
        "stream": BOOL,
        "stream_options": _STREAM_OPTIONS,
        "temperature": FLOAT32,
        "top_p": FLOAT32,
        "suffix": STRING,
        "logprobs": INT,
    },
)

OPENAI_EMBED_REQUEST: Final = struct(
    "openai.EmbedRequest",
    {"input": ANY, "model": STRING, "dimensions": INT, "encoding_format": STRING},
)

"""Deterministic replies and embeddings: pure functions of (model, input text).

The same model and prompt always give the same reply, token for token, in every process,
so tests and benchmarks can compare runs. Work is cached by a digest of the input, which
keeps repeated benchmark requests cheap without holding large prompts in memory.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import math
import random
import struct
from typing import Final

import msgspec

from compose.standin import corpus
from compose.standin.gojson import escape_html
from compose.standin.tokenizer import tokenize

__all__ = ["Reply", "embedding", "embedding_base64", "reply_for", "truncated"]

_JSON: Final = msgspec.json.Encoder()


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """A full reply before any `num_predict` cut: the tokens and their JSON encodings."""

    tokens: tuple[str, ...]
    #: Each token as a Go-escaped JSON string literal, for building chunks fast.
    encoded: tuple[bytes, ...]

    @property
    def text(self) -> str:
        """The whole reply."""
        return "".join(self.tokens)


def _seed(*parts: str) -> bytes:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.digest()


def reply_for(model: str, prompt: str, *, json_format: bool = False) -> Reply:
    """The reply `model` gives to `prompt` (the rendered prompt text)."""
    return _reply(model, _seed(model, prompt), json_format)


# Bounded: a long benchmark with unique prompts must not grow memory without limit.
@functools.lru_cache(maxsize=1024)
def _reply(model: str, seed: bytes, json_format: bool) -> Reply:
    rng = random.Random(seed)
    text = _json_text(rng) if json_format else _free_text(rng, coder="coder" in model)
    tokens = tuple(tokenize(text))
    return Reply(tokens=tokens, encoded=tuple(escape_html(_JSON.encode(token)) for token in tokens))


def _free_text(rng: random.Random, *, coder: bool) -> str:
    blocks = [rng.choice(corpus.OPENERS) + " " + " ".join(rng.sample(corpus.PROSE, 2))]
    for _ in range(rng.randint(0, 2)):
        roll = rng.random()
        if roll < (0.55 if coder else 0.2):
            lang, code = rng.choice(corpus.CODE_SNIPPETS)
            blocks.append(f"```{lang}\n{code}\n```")
        elif roll < 0.7:
            blocks.append(" ".join(rng.sample(corpus.PROSE, rng.randint(1, 3))))
        elif roll < 0.85:
            items = rng.sample(corpus.LIST_ITEMS, rng.randint(2, 4))
            blocks.append(
                "\n".join(f"{n}. {item.capitalize()}." for n, item in enumerate(items, 1))
            )
        else:
            blocks.append(" ".join(rng.sample(corpus.OTHER_SCRIPTS, rng.randint(1, 2))))
    if rng.random() < 0.2:
        blocks.append(rng.choice(corpus.OTHER_SCRIPTS))
    return "\n\n".join(blocks)


def _json_text(rng: random.Random) -> str:
    # What a model asked for `format: "json"` returns: one compact-ish JSON object.
    answer = rng.choice(corpus.PROSE)
    document = {
        "answer": answer,
        "confidence": round(rng.uniform(0.5, 0.99), 2),
        "keywords": sorted({w.strip(",;.").lower() for w in answer.split() if len(w) > 4})[:4],
    }
    return json.dumps(document, ensure_ascii=False)


@functools.lru_cache(maxsize=512)
def _unit_vector(model: str, seed: bytes, dims: int) -> tuple[float, ...]:
    raw = hashlib.shake_256(b"standin-embedding:" + model.encode() + seed).digest(2 * dims)
    values = memoryview(raw).cast("h")
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    # Rounded like float32 output: Go prints about seven significant digits.
    return tuple(round(v / norm, 7) for v in values)


def embedding(model: str, text: str, *, dims: int) -> tuple[float, ...]:
    """A unit vector of `dims` components for `text` under `model`."""
    return _unit_vector(model, _seed(model, text), dims)


def truncated(vector: tuple[float, ...], dims: int) -> tuple[float, ...]:
    """The first `dims` components, renormalised (Ollama's `dimensions` option)."""
    head = vector[:dims]
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return tuple(round(v / norm, 7) for v in head)


def embedding_base64(vector: tuple[float, ...]) -> str:
    """OpenAI's `encoding_format: base64`: little-endian float32, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

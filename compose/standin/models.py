"""The models the stand-in pretends to have, and Ollama's rules for naming them.

Names match case-insensitively with the default host `registry.ollama.ai`, namespace
`library` and tag `latest`, so `LLAMA3.2` and `registry.ollama.ai/library/llama3.2:latest`
are the same model. Replies echo the name as the client spelled it, like Ollama does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Final

__all__ = [
    "DEFAULT_MODELS",
    "Catalogue",
    "ModelCard",
    "canonical_name",
    "namespace_of",
]

_DEFAULT_HOST: Final = "registry.ollama.ai"
_DEFAULT_NAMESPACE: Final = "library"
_DEFAULT_TAG: Final = "latest"

_PART: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}")
_TAG: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}")
_HOST: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,349}")

#: Names that make a synthesised model (from NZ_STANDIN_MODELS) embedding-only.
_EMBEDDING_HINT: Final = re.compile(r"embed|minilm|bge|gte|e5-|arctic", re.IGNORECASE)

#: When the stand-in's models were "pulled" (fixed, so listings are reproducible).
_MODIFIED_AT: Final = "2026-08-01T09:30:00.123456789Z"
_MODIFIED_UNIX: Final = 1785576600


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelCard:
    """What Ollama knows about one local model."""

    name: str  # canonical, e.g. "llama3.2:latest"
    family: str
    parameter_size: str
    quantization_level: str
    size: int
    capabilities: tuple[str, ...]
    context_length: int
    embedding_length: int
    parameter_count: int
    modified_at: str = _MODIFIED_AT
    modified_unix: int = _MODIFIED_UNIX

    @property
    def digest(self) -> str:
        """Hex digest of the (imaginary) manifest, as /api/tags shows it."""
        return hashlib.sha256(f"standin-manifest:{self.name}".encode()).hexdigest()

    def supports(self, capability: str) -> bool:
        """Whether the model has `capability` (completion, embedding, tools, insert, ...)."""
        return capability in self.capabilities


DEFAULT_MODELS: Final = (
    ModelCard(
        name="llama3.2:latest",
        family="llama",
        parameter_size="3.2B",
        quantization_level="Q4_K_M",
        size=2_019_393_189,
        capabilities=("completion", "tools"),
        context_length=131_072,
        embedding_length=3072,
        parameter_count=3_212_749_888,
    ),
    ModelCard(
        name="qwen2.5-coder:7b",
        family="qwen2",
        parameter_size="7.6B",
        quantization_level="Q4_K_M",
        size=4_683_087_332,
        capabilities=("completion", "tools", "insert"),
        context_length=32_768,
        embedding_length=3584,
        parameter_count=7_615_616_512,
    ),
    ModelCard(
        name="all-minilm:latest",
        family="bert",
        parameter_size="23M",
        quantization_level="F16",
        size=45_960_996,
        capabilities=("embedding",),
        context_length=512,
        embedding_length=384,
        parameter_count=22_565_376,
    ),
)


def _split(name: str) -> tuple[str, str, str, str] | None:
    """(host, namespace, model, tag) with defaults filled in, or None if not a valid name."""
    name = name.strip()
    parts = name.split("/")
    if len(parts) > 3:
        return None
    last = parts[-1]
    model, sep, tag = last.partition(":")
    if not sep:
        tag = _DEFAULT_TAG
    host = parts[0] if len(parts) == 3 else _DEFAULT_HOST
    namespace = parts[-2] if len(parts) >= 2 else _DEFAULT_NAMESPACE
    valid = (
        _HOST.fullmatch(host)
        and _PART.fullmatch(namespace)
        and _PART.fullmatch(model)
        and _TAG.fullmatch(tag)
    )
    return (host, namespace, model, tag) if valid else None


def canonical_name(name: str) -> str | None:
    """The lookup key for `name` (`model:tag`, or `ns/model:tag` off the library), or None."""
    split = _split(name)
    if split is None:
        return None
    host, namespace, model, tag = (part.lower() for part in split)
    prefix = "" if namespace == _DEFAULT_NAMESPACE else f"{namespace}/"
    if host != _DEFAULT_HOST:
        prefix = f"{host}/{namespace}/"
    return f"{prefix}{model}:{tag}"


def namespace_of(name: str) -> str:
    """The namespace part of `name` (`library` unless given), as /v1/models' `owned_by`."""
    split = _split(name)
    return _DEFAULT_NAMESPACE if split is None else split[1]


def _synthesise(name: str) -> ModelCard:
    embedding = bool(_EMBEDDING_HINT.search(name))
    family = re.match(r"[a-z]+", name.rpartition("/")[2]) if name else None
    return ModelCard(
        name=name,
        family=family.group(0) if family else "llama",
        parameter_size="335M" if embedding else "7B",
        quantization_level="F16" if embedding else "Q4_K_M",
        size=669_615_493 if embedding else 4_661_224_676,
        capabilities=("embedding",) if embedding else ("completion", "tools"),
        context_length=512 if embedding else 8192,
        embedding_length=1024 if embedding else 4096,
        parameter_count=334_094_336 if embedding else 7_241_732_096,
    )


class Catalogue:
    """The models on this server, looked up the way Ollama resolves a request's name."""

    def __init__(self, cards: Iterable[ModelCard]) -> None:
        self.cards: Final = tuple(cards)
        self._by_key: Final = {card.name: card for card in self.cards}

    @classmethod
    def from_names(cls, names: Sequence[str] | None) -> Catalogue:
        """The default models, or the named ones (known names keep their metadata)."""
        if not names:
            return cls(DEFAULT_MODELS)
        known = {card.name: card for card in DEFAULT_MODELS}
        cards: dict[str, ModelCard] = {}
        for raw in names:
            key = canonical_name(raw)
            if key is None:
                raise ValueError(f"not a valid model name: {raw!r}")
            cards[key] = known.get(key) or _synthesise(key)
        return cls(cards.values())

    def find(self, requested: str) -> ModelCard | None:
        """The model `requested` names, or None (also for names Ollama would not parse)."""
        key = canonical_name(requested)
        return None if key is None else self._by_key.get(key)

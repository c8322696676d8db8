"""The stand-in's settings, read once from an explicit environment mapping."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Final

__all__ = ["ENV_FIRST_TOKEN_MS", "ENV_MODELS", "ENV_TOKENS_PER_S", "StandinSettings"]

ENV_TOKENS_PER_S: Final = "NZ_STANDIN_TOKENS_PER_S"
ENV_FIRST_TOKEN_MS: Final = "NZ_STANDIN_FIRST_TOKEN_MS"
ENV_MODELS: Final = "NZ_STANDIN_MODELS"

_DEFAULT_TOKENS_PER_S: Final = 40.0
_DEFAULT_FIRST_TOKEN_MS: Final = 150.0


def _number(env: Mapping[str, str], name: str, default: float, errors: list[str]) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        errors.append(f"{name} must be a number, got {raw!r}")
        return default
    if not math.isfinite(value):
        errors.append(f"{name} must be finite, got {raw!r}")
        return default
    return value


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StandinSettings:
    """Timing and model list. `tokens_per_s <= 0` means as fast as possible."""

    tokens_per_s: float = _DEFAULT_TOKENS_PER_S
    first_token_ms: float = _DEFAULT_FIRST_TOKEN_MS
    models: tuple[str, ...] = ()

    @property
    def token_interval_s(self) -> float:
        """Seconds between two tokens (0 when unthrottled)."""
        return 1.0 / self.tokens_per_s if self.tokens_per_s > 0 else 0.0

    @property
    def first_token_s(self) -> float:
        """Seconds from request to first token."""
        return max(self.first_token_ms, 0.0) / 1000.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> StandinSettings:
        """Read NZ_STANDIN_*; raises ValueError naming every bad variable at once."""
        errors: list[str] = []
        tokens_per_s = _number(env, ENV_TOKENS_PER_S, _DEFAULT_TOKENS_PER_S, errors)
        first_token_ms = _number(env, ENV_FIRST_TOKEN_MS, _DEFAULT_FIRST_TOKEN_MS, errors)
        if first_token_ms < 0:
            errors.append(f"{ENV_FIRST_TOKEN_MS} must not be negative, got {first_token_ms:g}")
        models = tuple(name.strip() for name in env.get(ENV_MODELS, "").split(",") if name.strip())
        if errors:
            raise ValueError("invalid stand-in settings: " + "; ".join(errors))
        return cls(tokens_per_s=tokens_per_s, first_token_ms=first_token_ms, models=models)

"""Read NZ_* settings from an environment mapping, collecting every problem at once.

Dependency-free like `contract`: meterd reads its settings with it too, so both daemons
check a value the same way and report it in the same words, and an operator fixes the
whole configuration in one go instead of one error per start.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final
from urllib.parse import urlsplit

__all__ = ["LOG_LEVELS", "EnvReader", "redacted_url"]

LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")


def redacted_url(url: str) -> str:
    """The URL with its password (and any query, which may hold one) replaced by `***`.

    For reprs and log lines: settings objects hold URLs with credentials.
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        credentials, at, host = netloc.rpartition("@")
        if at and ":" in credentials:
            netloc = f"{credentials.partition(':')[0]}:***@{host}"
        query = "?***" if parts.query else ""
        return f"{parts.scheme}://{netloc}{parts.path}{query}"
    except ValueError:
        return "***"


class EnvReader:
    """Typed reads of one environment; each bad value adds to `errors` and yields a default."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        self.errors: list[str] = []

    def text(self, name: str, default: str = "") -> str:
        """The value without surrounding whitespace; `default` when unset or blank."""
        return self._env.get(name, "").strip() or default

    def required(self, name: str) -> str:
        """A value that must be set."""
        value = self.text(name)
        if not value:
            self.errors.append(f"{name} is required")
        return value

    def url(self, name: str, schemes: tuple[str, ...]) -> str:
        """A required URL whose scheme is one of `schemes`."""
        value = self.required(name)
        if value and urlsplit(value).scheme not in schemes:
            self.errors.append(
                f"{name} must start with one of {', '.join(s + '://' for s in schemes)}"
            )
        return value

    def number(
        self, name: str, default: float, *, integer: bool = False, above: float = 0.0
    ) -> float:
        """A finite number greater than `above` (whole if `integer`); `default` when unset."""
        raw = self.text(name)
        if not raw:
            return default
        try:
            value = int(raw) if integer else float(raw)
        except ValueError:
            kind = "a whole number" if integer else "a number"
            self.errors.append(f"{name} must be {kind}, got {raw!r}")
            return default
        if not math.isfinite(value):  # float() accepts "nan" and "inf"
            self.errors.append(f"{name} must be a finite number, got {raw!r}")
            return default
        if not value > above:
            self.errors.append(f"{name} must be greater than {above:g}, got {raw!r}")
            return default
        return value

    def log_level(self, name: str) -> str:
        """One of `LOG_LEVELS`, any case; INFO when unset."""
        level = self.text(name, "INFO").upper()
        if level not in LOG_LEVELS:
            self.errors.append(f"{name} must be {', '.join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]}")
        return level

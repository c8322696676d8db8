"""Everything one stand-in worker keeps between requests."""

from __future__ import annotations

import math
import time
from typing import Final

from compose.standin.models import Catalogue, ModelCard
from compose.standin.recorder import Recorder
from compose.standin.settings import StandinSettings

__all__ = ["DEFAULT_KEEP_ALIVE_S", "Runner", "ServerState"]

#: A runner's load-affecting options, sorted (name, value) pairs.
Runner = tuple[tuple[str, object], ...]

#: Ollama keeps a model loaded for five minutes after its last request by default.
DEFAULT_KEEP_ALIVE_S: Final = 300.0
#: "Forever" for /api/ps: Go's maximal duration from now lands in year 2318.
_FOREVER_NS: Final = 2**63 - 1


class ServerState:
    """Settings, models, the request log, and which models count as loaded (/api/ps)."""

    def __init__(self, settings: StandinSettings) -> None:
        self.settings: Final = settings
        self.catalogue: Final = Catalogue.from_names(settings.models)
        self.recorder: Final = Recorder()
        self._expiry_ns: Final[dict[str, int]] = {}
        #: Per model: the load-affecting options its runner was started with.
        self._runners: Final[dict[str, Runner]] = {}
        #: Per model: how often a runner was started (first loads and reloads).
        self.loads: Final[dict[str, int]] = {}

    def is_loaded(self, card: ModelCard) -> bool:
        """Whether `card` has a live runner now."""
        return self._expiry_ns.get(card.name, 0) > time.time_ns()

    def use(self, card: ModelCard, runner: Runner) -> bool:
        """A request needs `card` with `runner` options; True if a runner (re)started.

        Like Ollama's scheduler (`server/sched.go: needsReload`): a loaded runner whose
        options differ from the request's is stopped and started again.
        """
        if self.is_loaded(card) and self._runners.get(card.name) == runner:
            return False
        self._runners[card.name] = runner
        self.loads[card.name] = self.loads.get(card.name, 0) + 1
        return True

    def runners(self) -> dict[str, dict[str, object]]:
        """For `/__standin/runners`: each model's runner options, load count and state."""
        cards = {card.name: card for card in self.catalogue.cards}
        return {
            name: {
                "options": dict(self._runners.get(name, ())),
                "loads": count,
                "loaded": self.is_loaded(cards[name]),
            }
            for name, count in self.loads.items()
        }

    def touch(self, card: ModelCard, *, keep_alive_s: float | None) -> None:
        """A request used `card`; it stays loaded for `keep_alive_s` (default five minutes)."""
        seconds = DEFAULT_KEEP_ALIVE_S if keep_alive_s is None else keep_alive_s
        self._expiry_ns.pop(card.name, None)  # re-inserted last: most recent
        if seconds == 0:
            return
        if math.isinf(seconds):
            self._expiry_ns[card.name] = _FOREVER_NS
        else:
            self._expiry_ns[card.name] = time.time_ns() + int(seconds * 1e9)

    def unload(self, card: ModelCard) -> None:
        """Drop `card` from the loaded set (keep_alive 0)."""
        self._expiry_ns.pop(card.name, None)

    def loaded(self) -> list[tuple[ModelCard, int]]:
        """Loaded models with their expiry (wall-clock ns), most recently used first."""
        now = time.time_ns()
        live = [(name, expiry) for name, expiry in self._expiry_ns.items() if expiry > now]
        cards = {card.name: card for card in self.catalogue.cards}
        return [(cards[name], expiry) for name, expiry in reversed(live) if name in cards]

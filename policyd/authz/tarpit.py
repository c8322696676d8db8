"""Holding back the answer to an authentication failure that keeps coming back.

A refused client that reconnects at once costs Caddy and policyd a connection, a
forward_auth round trip and a refusal each time: four closed-loop clients posting junk
with a wrong key made ~540 refusals a second, most of two cores that valid keys needed
(docs/performance.md, scenario 8). Answering a repeat only after `delay_s` caps such a
client at one refusal per delay and connection, for the price of a sleeping task.

A failure is a repeat when the key store says so (this exact secret already failed, or
its prefix spent its failure budget) or when its client (Caddy's `client_ip`) failed more
than `client_budget` times in the window. A first mistake is answered at once; what a
person retyping a key does stays fast. At most `max_held` answers wait at a time, so the
held ones can never take the server's capacity from valid requests: past that, repeats
are answered at once (and counted), as before this existed.
"""

from __future__ import annotations

import asyncio
from typing import Final

from policyd.authz import metrics
from policyd.authz.bounded import WindowCounts

__all__ = ["Tarpit"]

#: Clients whose failures are counted at once; the oldest is forgotten past it.
_MAX_CLIENTS: Final = 65_536


class Tarpit:
    """Delays for repeated authentication failures; one per policyd process."""

    def __init__(
        self, *, delay_s: float, client_budget: int, window_s: float, max_held: int
    ) -> None:
        self.delay_s: Final = delay_s
        self._client_budget = client_budget
        self._max_held = max_held
        self._failures: WindowCounts[str] = WindowCounts(window_s=window_s, limit=_MAX_CLIENTS)
        self.held_now = 0
        self.held = 0  # answers that waited
        self.overflowed = 0  # repeats answered at once because max_held were waiting

    async def hold(self, client: str | None, *, repeated: bool) -> bool:
        """Wait before a failure's answer when it is a repeat; True when it waited."""
        strikes = self._failures.add(client) if client else 0
        if self.delay_s <= 0 or not (repeated or strikes > self._client_budget):
            return False
        if self.held_now >= self._max_held:
            self.overflowed += 1
            metrics.auth_held(overflow=True)
            return False
        self.held_now += 1
        self.held += 1
        metrics.auth_held(overflow=False)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.held_now -= 1
        return True

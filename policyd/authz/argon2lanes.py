"""Where Argon2id runs: two bounded lanes, so failures can never take every slot.

- The *clean* lane verifies secrets for prefixes with no recent failure: a valid key's
  first use lands here and waits only for other clean verifications.
- The *suspect* lane verifies secrets for prefixes that failed recently. It has one slot
  and a token bucket; when the bucket is empty the caller refuses without Argon2id. A
  flood of wrong secrets therefore costs at most `suspect_per_s` hashes a second.

A refusal that needs no hash (unknown prefix, a cached key's wrong secret) *pads*: it
sleeps for about as long as a hash takes, in the same lane, so its timing matches a wrong
secret for a known, uncached prefix. Sleeping costs no CPU.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

from policyd.authz import metrics
from policyd.shared.keys import verify_key_hash

__all__ = ["Argon2Lanes"]

#: A first guess of one hash's duration, replaced by measurements as hashes run.
_INITIAL_HASH_S: Final = 0.03
#: Weight of the newest measurement in the running average.
_EWMA_WEIGHT: Final = 0.2


class Argon2Lanes:
    """The clean and suspect Argon2id lanes of one policyd process."""

    def __init__(self, *, suspect_per_s: float) -> None:
        self._clean = asyncio.Semaphore(1)
        self._suspect = asyncio.Semaphore(1)
        self._rate = suspect_per_s
        self._tokens = suspect_per_s
        self._refilled = time.monotonic()
        self._hash_s = _INITIAL_HASH_S
        self.runs = 0  # Argon2id hashes run, for /statsz
        self.pads = 0  # refusals padded to a hash's duration, for /statsz
        self.throttled = 0  # suspect verifications refused for want of a token, for /statsz

    def take_suspect_token(self) -> bool:
        """Spend one of the suspect lane's tokens; False when the bucket is empty."""
        now = time.monotonic()
        self._tokens = min(self._rate, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens < 1:
            self.throttled += 1
            return False
        self._tokens -= 1
        return True

    async def verify(self, stored_hash: str, full: str, *, suspect: bool) -> bool:
        """Argon2id check in the lane the caller chose."""
        async with self._suspect if suspect else self._clean:
            self.runs += 1
            metrics.argon2_run()
            started = time.monotonic()
            valid = await asyncio.to_thread(verify_key_hash, stored_hash, full)
            took = time.monotonic() - started
        self._hash_s += _EWMA_WEIGHT * (took - self._hash_s)
        return valid

    async def pad(self, *, suspect: bool) -> None:
        """Take as long as a hash would, without hashing.

        A suspect pad holds the suspect slot like a hash would; a first-sight pad holds
        no slot, so a spray of unknown prefixes cannot delay the clean lane.
        """
        self.pads += 1
        if suspect:
            async with self._suspect:
                await asyncio.sleep(self._hash_s)
        else:
            await asyncio.sleep(self._hash_s)

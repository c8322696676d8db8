"""Process counters behind `/statsz`: what the hot path spent its work on.

Tests and benchmarks read them to prove what did *not* happen (no body parsed for an
unverified key, no Argon2 run for a remembered failure) without timing anything.
"""

from __future__ import annotations

import attrs

__all__ = ["Stats"]


@attrs.define
class Stats:
    """Monotonic counters of one policyd process (reset only by a restart)."""

    #: Requests whose X-Nz-Body was decoded and parsed (only ever for a verified key).
    bodies_screened: int = 0

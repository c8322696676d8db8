"""The bounded in-process memories behind policyd's failure, prefix and client caches."""

from __future__ import annotations

import time

from policyd.authz.bounded import ExpiringSet, WindowCounts


def test_a_key_is_remembered_until_it_expires() -> None:
    """`left_s` is positive while remembered and 0 once the time is up (or never added)."""
    memory: ExpiringSet[str] = ExpiringSet(limit=10)
    memory.add("a", for_s=60)
    memory.add("b", for_s=0.001)
    time.sleep(0.01)
    assert 59 < memory.left_s("a") <= 60
    assert memory.left_s("b") == 0
    assert memory.left_s("never") == 0
    assert len(memory) == 1


def test_a_spray_of_keys_cannot_grow_it_past_its_limit() -> None:
    """Past the limit the oldest entry goes, expired or not; re-adding refreshes an entry."""
    memory: ExpiringSet[int] = ExpiringSet(limit=100)
    for key in range(100):
        memory.add(key, for_s=60)
    memory.add(0, for_s=60)  # now the newest
    for key in range(100, 10_000):
        memory.add(key, for_s=60)
    assert len(memory) == 100
    assert memory.left_s(0) == 0
    assert memory.left_s(9_999) > 0


def test_window_counts_restart_after_the_window_and_forget_the_oldest_past_the_limit() -> None:
    counts: WindowCounts[str] = WindowCounts(window_s=0.05, limit=2)
    assert [counts.add("a"), counts.add("a"), counts.add("b")] == [1, 2, 1]
    counts.add("c")  # "a" is the oldest: forgotten
    assert len(counts) == 2
    assert counts.add("a") == 1
    time.sleep(0.06)
    assert counts.add("a") == 1

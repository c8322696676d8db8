"""The tarpit's rules, in-process: which failures wait, and that waiting is bounded."""

from __future__ import annotations

import asyncio

from policyd.authz.tarpit import Tarpit


def _tarpit(
    *, delay_s: float = 0.05, budget: int = 2, window_s: float = 60, held: int = 4
) -> Tarpit:
    return Tarpit(delay_s=delay_s, client_budget=budget, window_s=window_s, max_held=held)


def test_a_first_failure_is_answered_at_once_and_a_repeat_waits() -> None:
    tarpit = _tarpit()
    assert asyncio.run(tarpit.hold("10.0.0.1", repeated=False)) is False
    assert asyncio.run(tarpit.hold("10.0.0.1", repeated=True)) is True
    assert (tarpit.held, tarpit.held_now) == (1, 0)


def test_a_client_over_its_budget_waits_whatever_it_sends() -> None:
    tarpit = _tarpit(budget=2)
    waited = [asyncio.run(tarpit.hold("10.0.0.1", repeated=False)) for _ in range(4)]
    assert waited == [False, False, True, True]
    # Another client has its own count; an unknown client is never counted.
    assert asyncio.run(tarpit.hold("10.0.0.2", repeated=False)) is False
    assert asyncio.run(tarpit.hold(None, repeated=False)) is False


def test_the_count_starts_again_after_the_window() -> None:
    tarpit = _tarpit(budget=1, window_s=0.05)
    assert asyncio.run(tarpit.hold("10.0.0.1", repeated=False)) is False
    assert asyncio.run(tarpit.hold("10.0.0.1", repeated=False)) is True
    asyncio.run(asyncio.sleep(0.06))
    assert asyncio.run(tarpit.hold("10.0.0.1", repeated=False)) is False


def test_no_more_than_max_held_wait_at_once() -> None:
    tarpit = _tarpit(delay_s=0.2, held=3)

    async def flood() -> list[bool]:
        return await asyncio.gather(*(tarpit.hold("10.0.0.1", repeated=True) for _ in range(10)))

    waited = asyncio.run(flood())
    assert waited.count(True) == 3
    assert tarpit.overflowed == 7
    assert tarpit.held_now == 0


def test_a_zero_delay_holds_nothing() -> None:
    tarpit = _tarpit(delay_s=0)
    assert asyncio.run(tarpit.hold("10.0.0.1", repeated=True)) is False
    assert tarpit.held == 0

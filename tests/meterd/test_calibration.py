"""calibration.py: per-tenant figures on a bounded base; what one tenant can move."""

from __future__ import annotations

import math

import pytest

from meterd.calibration import (
    BASE_RANGE,
    MIN_N,
    OWN_RANGE,
    PRIORS,
    RATE_FLOOR,
    STEP,
    Calibration,
    Observation,
)

_MODEL = "llama3.2:latest"
_PATH = "/api/chat"


def _obs(tenant: str, *, prompt: float | None = None, reply: float | None = None) -> Observation:
    return Observation(tenant=tenant, model=_MODEL, path=_PATH, prompt=prompt, reply=reply)


def _train(calibration: Calibration, tenant: str, value: float, *, n: int = MIN_N) -> None:
    for _ in range(n):
        calibration.learn([_obs(tenant, prompt=value, reply=value * 4)])


@pytest.mark.parametrize("value", [0.25, 4.0], ids=["deflate", "inflate"])
def test_one_tenants_traffic_never_moves_anothers_figure(value: float) -> None:
    """The attacker learns only into its own row: the victim's figure and a fresh tenant's
    (the prior, fewer than three tenants calibrated) stay exactly where they were."""
    calibration = Calibration()
    _train(calibration, "victim", 1.0, n=6)
    before = [
        calibration.figure(f, t, _MODEL, _PATH)
        for f in ("prompt", "reply")
        for t in ("victim", "fresh")
    ]
    _train(calibration, "attacker", value, n=500)
    calibration.replace(calibration.rows().values())  # a reload recomputes the base
    after = [
        calibration.figure(f, t, _MODEL, _PATH)
        for f in ("prompt", "reply")
        for t in ("victim", "fresh")
    ]
    assert after == before


@pytest.mark.parametrize("value", [0.25, 4.0], ids=["deflate", "inflate"])
def test_the_base_stays_within_the_honest_tenants_figures(value: float) -> None:
    """With three honest tenants, an attacker moves the median base at most to a
    neighbouring honest figure, never beyond the honest range."""
    calibration = Calibration()
    for tenant, figure in (("a", 0.9), ("b", 1.0), ("c", 1.2)):
        _train(calibration, tenant, figure)
    _train(calibration, "attacker", value, n=500)
    calibration.replace(calibration.rows().values())
    base = calibration.base("prompt", _MODEL, _PATH)
    assert 0.9 - 1e-9 <= base <= 1.2 + 1e-9


def test_the_base_stays_within_its_range_of_the_prior() -> None:
    """Even if every tenant agreed on an extreme figure, the base moves at most BASE_RANGE."""
    calibration = Calibration()
    for tenant in "abcd":
        _train(calibration, tenant, 3.9)
    calibration.replace(calibration.rows().values())
    assert calibration.base("prompt", _MODEL, _PATH) == pytest.approx(PRIORS["prompt"] * BASE_RANGE)


def test_a_tenant_lowers_its_own_charge_by_at_most_its_range() -> None:
    """Deflating one's own figures is bounded: prompt ratio at least base / range, bytes
    per token at most base * range."""
    calibration = Calibration()
    _train(calibration, "attacker", 0.25, n=500)
    for _ in range(500):
        calibration.learn([_obs("other", reply=16.0)])
    prompt = calibration.figure("prompt", "attacker", _MODEL, _PATH)
    reply = calibration.figure("reply", "other", _MODEL, _PATH)
    assert prompt == pytest.approx(PRIORS["prompt"] / OWN_RANGE["prompt"])
    assert reply == pytest.approx(PRIORS["reply"] * OWN_RANGE["reply"])


def test_a_trained_figure_moves_slowly() -> None:
    """After n observations, one batch of k pulls a figure by at most STEP * max(k/n, floor*k)."""
    calibration = Calibration()
    _train(calibration, "t", 1.0, n=100)
    row = calibration.rows()[("t", _MODEL, _PATH)]
    calibration.learn([_obs("t", prompt=4.0)] * 3)
    moved = calibration.rows()[("t", _MODEL, _PATH)].prompt_log - row.prompt_log
    assert 0 < moved <= STEP * max(3 / (row.prompt_n + 1), RATE_FLOOR * 3) + 1e-12
    assert moved <= math.log(1.01)


@pytest.mark.parametrize(
    ("counted", "tokens"), [(0, 10), (5, 10), (100, 0), (100, 1000), (100, 10)]
)
def test_implausible_pairs_teach_nothing(counted: int, tokens: int) -> None:
    """Too short to tell, nothing counted, or a ratio beyond the plausible range: ignored."""
    obs = Observation.build(
        tenant="t",
        model=_MODEL,
        path=_PATH,
        counted=counted,
        prompt_tokens=tokens,
        reply_bytes=0,
        completion_tokens=0,
    )
    assert obs is None

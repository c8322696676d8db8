"""How long and how hard each scenario runs: full (`make bench`), quick, and smoke."""

from __future__ import annotations

import attrs

__all__ = ["FULL", "QUICK", "SMOKE", "Plan"]


@attrs.frozen(kw_only=True)
class Plan:
    """Durations in seconds, rates per second; every scenario reads only its own fields."""

    name: str
    rounds: int
    warmup_s: float
    #: Scenario 1: wrk closed loop at saturation, then open loop at each fixed rate
    #: (the first is the headline figure).
    saturate_s: float
    wrk_connections: int
    fixed_rates: tuple[float, ...]
    fixed_s: float
    #: Scenario 2: streams start at `stream_rate`/s, each `stream_tokens` tokens long.
    stream_rate: float
    stream_count: int
    stream_tokens: int
    stream_tokens_per_s: float
    stream_first_token_ms: int
    #: Scenario 3: policyd alone over its socket.
    policyd_s: float
    policyd_concurrency: int
    miss_keys: int
    #: Scenario 4: seconds of saturating traffic written while meterd is stopped. The
    #: backlog must span many of meterd's 500-line batches: the first is not timed.
    meterd_backlog_s: float
    #: Scenarios 6 and 7: sequential requests on one connection, in blocks that
    #: alternate between the targets compared.
    sequential_blocks: int
    sequential_block_size: int
    #: Scenario 5: calls timed per mode when measuring what the metrics cost a decision.
    metrics_iterations: int = 200_000
    #: Scenario 6: the valid key's small requests at `attack_valid_rate`/s for
    #: `attack_s`, alone and beside the attack (issue 13's strength in the full plan),
    #: plus the first request of `attack_first_uses` fresh keys in each phase.
    attack_valid_rate: float
    attack_s: float
    attack_junk_clients: int
    attack_wrong_per_s: float
    attack_slow_clients: int
    attack_slow_gap_s: float
    attack_first_uses: int


FULL = Plan(
    name="full",
    rounds=3,
    warmup_s=3.0,
    saturate_s=5.0,
    wrk_connections=32,
    fixed_rates=(100.0, 200.0),
    fixed_s=6.0,
    stream_rate=50.0,
    stream_count=400,
    stream_tokens=40,
    stream_tokens_per_s=10.0,
    stream_first_token_ms=50,
    policyd_s=4.0,
    policyd_concurrency=8,
    miss_keys=24,
    meterd_backlog_s=16.0,
    sequential_blocks=12,
    sequential_block_size=100,
    attack_valid_rate=20.0,
    attack_s=20.0,
    attack_junk_clients=4,
    attack_wrong_per_s=60.0,
    attack_slow_clients=10,
    attack_slow_gap_s=2.0,
    attack_first_uses=4,
)

QUICK = attrs.evolve(
    FULL,
    name="quick",
    rounds=1,
    warmup_s=1.0,
    saturate_s=1.0,
    fixed_rates=(100.0,),
    fixed_s=3.0,
    stream_count=100,
    stream_tokens=20,
    policyd_s=1.5,
    miss_keys=6,
    meterd_backlog_s=5.0,
    sequential_blocks=4,
    sequential_block_size=50,
    attack_s=5.0,
    attack_first_uses=2,
)

SMOKE = attrs.evolve(
    FULL,
    name="smoke",
    rounds=1,
    warmup_s=0.2,
    saturate_s=1.0,
    wrk_connections=4,
    fixed_rates=(20.0,),
    fixed_s=0.5,
    stream_rate=20.0,
    stream_count=6,
    stream_tokens=5,
    stream_tokens_per_s=100.0,
    stream_first_token_ms=10,
    policyd_s=0.3,
    policyd_concurrency=2,
    miss_keys=2,
    metrics_iterations=20_000,
    meterd_backlog_s=1.0,
    sequential_blocks=1,
    sequential_block_size=5,
    attack_valid_rate=10.0,
    attack_s=0.5,
    attack_junk_clients=1,
    attack_wrong_per_s=5.0,
    attack_slow_clients=1,
    attack_slow_gap_s=0.2,
    attack_first_uses=1,
)

"""meterd's settings: defaults, bounds, and every problem reported at once."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import pytest

from meterd.settings import SettingsError, load_settings

_VALID: Final = {
    "NZ_DATABASE_URL": "postgresql+asyncpg://nz@127.0.0.1/nz",
    "NZ_REDIS_URL": "unix:///run/redis.sock",
    "NZ_ACCESS_LOG": "/var/log/caddy/access.log",
}


def test_defaults() -> None:
    """Unset values take the documented defaults; the node defaults to the host name."""
    settings = load_settings({**_VALID, "NZ_METERD_POLL_S": "0.05"})
    assert settings.access_log == Path("/var/log/caddy/access.log")
    assert settings.node
    assert settings.poll_s == 0.05
    assert settings.batch_lines == 500
    assert settings.heartbeat_ttl_s == 30
    assert settings.log_level == "INFO"


def test_every_problem_is_reported_at_once() -> None:
    """Relative log path, bad numbers and bounds are all named in one error."""
    env = {
        **_VALID,
        "NZ_ACCESS_LOG": "access.log",
        "NZ_METERD_BATCH_LINES": "many",
        "NZ_METERD_HEARTBEAT_TTL_S": "2",
        "NZ_METERD_MAX_LINE_BYTES": "4095",
        "NZ_METERD_LOG_LEVEL": "trace",
    }
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    message = str(caught.value)
    for expected in (
        "NZ_ACCESS_LOG must be an absolute path",
        "NZ_METERD_BATCH_LINES must be a whole number, got 'many'",
        "NZ_METERD_HEARTBEAT_TTL_S must be greater than 2, got '2'",
        "NZ_METERD_MAX_LINE_BYTES must be greater than 4095, got '4095'",
        "NZ_METERD_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR",
    ):
        assert expected in message


def test_prompt_retention_is_bounded_and_leases_are_polled_often() -> None:
    """The default retention may not exceed the stated maximum; the lease follower looks
    for new lines every 50 ms unless told otherwise."""
    assert load_settings(_VALID).lease_poll_s == 0.05
    with pytest.raises(SettingsError, match="at most 3650"):
        load_settings({**_VALID, "NZ_METERD_PROMPT_RETENTION_DAYS": "100000000"})

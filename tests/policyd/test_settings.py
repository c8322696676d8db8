"""policyd's settings and the environment reader both daemons share."""

from __future__ import annotations

from typing import Final

import pytest

from policyd.authz.settings import DEFAULT_MAX_BODY_BYTES, SettingsError, load_settings
from policyd.shared.envreader import EnvReader, redacted_url

_VALID: Final = {
    "NZ_DATABASE_URL": "postgresql+asyncpg://nz@127.0.0.1/nz",
    "NZ_REDIS_URL": "redis://127.0.0.1:6379/0",
    "NZ_OLLAMA_URL": "http://127.0.0.1:11434/",
    "NZ_KEY_HMAC_SECRET": "s" * 32,
}


def test_defaults_and_units() -> None:
    """Unset numbers take their defaults; milliseconds become seconds; the URL loses its slash."""
    settings = load_settings({**_VALID, "NZ_STORE_TIMEOUT_MS": "250", "NZ_LOG_LEVEL": " debug "})
    assert settings.max_body_bytes == DEFAULT_MAX_BODY_BYTES
    assert settings.key_cache_ttl_s == 0.5
    assert settings.store_timeout_s == 0.25
    assert settings.ollama_url == "http://127.0.0.1:11434"
    assert settings.log_level == "DEBUG"


def test_every_problem_is_reported_at_once_without_the_secret() -> None:
    """One error lists every bad value, so an operator fixes the configuration in one go."""
    env = {
        "NZ_DATABASE_URL": "postgresql://nz@127.0.0.1/nz",
        "NZ_OLLAMA_URL": "ftp://ollama",
        "NZ_KEY_HMAC_SECRET": "short-secret-value",
        "NZ_MAX_BODY_BYTES": "8MB",
        "NZ_LEASE_TTL_S": "-1",
        "NZ_LOG_LEVEL": "loud",
    }
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    message = str(caught.value)
    for expected in (
        "NZ_DATABASE_URL must start with one of postgresql+asyncpg://",
        "NZ_REDIS_URL is required",
        "NZ_OLLAMA_URL must start with one of http://, https://",
        "NZ_KEY_HMAC_SECRET must be at least 32 characters",
        "NZ_MAX_BODY_BYTES must be a whole number, got '8MB'",
        "NZ_LEASE_TTL_S must be greater than 0, got '-1'",
        "NZ_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR",
    ):
        assert expected in message
    assert "short-secret-value" not in message


def test_several_ollama_hosts_separated_by_spaces() -> None:
    """NZ_OLLAMA_URL lists hosts as Caddy reads them: space-separated, each with its dial."""
    urls = " http://10.0.0.1:11434/  http://gpu-b:11434\thttp://[::1]:9 http://gpu-c "
    settings = load_settings({**_VALID, "NZ_OLLAMA_URL": urls})
    assert [(u.url, u.dial) for u in settings.upstreams] == [
        ("http://10.0.0.1:11434", "10.0.0.1:11434"),
        ("http://gpu-b:11434", "gpu-b:11434"),
        ("http://[::1]:9", "[::1]:9"),
        ("http://gpu-c", "gpu-c:80"),
    ]
    assert settings.ollama_url == "http://10.0.0.1:11434"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("http://a:1,http://b:2", "separate several hosts with spaces, not commas"),
        ("http://a:1 https://b:2", "all hosts must use the same scheme"),
        ("http://a:1 http://a:1/", "a host is listed twice"),
        ("http://a:1 http://b:2/v1", "host 2 must be a bare base URL"),
        ("http://user:secret@a:1", "host 1 must be a bare base URL"),
        ("http://a:99999", "host 1 has an invalid port"),
        ("   ", "NZ_OLLAMA_URL is required"),
    ],
)
def test_bad_host_lists_are_refused_without_echoing_them(value: str, problem: str) -> None:
    """Every malformed list is refused with its reason; a URL's credentials never echo."""
    with pytest.raises(SettingsError) as caught:
        load_settings({**_VALID, "NZ_OLLAMA_URL": value})
    assert problem in str(caught.value)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize("raw", ["nan", "inf", "0", "1.5"])
def test_numbers_must_be_finite_and_above_the_bound(raw: str) -> None:
    """NaN, infinity and values at the bound are refused; fractions only where allowed."""
    whole = EnvReader({"N": raw})
    whole.number("N", 7, integer=True)
    assert whole.errors, raw
    fraction = EnvReader({"N": raw})
    value = fraction.number("N", 7.0, above=1.0)
    assert (not fraction.errors) == (raw == "1.5"), raw
    assert value == (float(raw) if not fraction.errors else 7.0)


def test_blank_values_count_as_unset() -> None:
    """Whitespace-only values are unset: defaults apply, required ones are reported."""
    read = EnvReader({"A": "  ", "B": "\t"})
    assert read.number("A", 3, integer=True) == 3
    assert read.text("B", "fallback") == "fallback"
    assert read.required("B") == ""
    assert read.errors == ["B is required"]


def test_no_secret_in_the_settings_repr() -> None:
    """Both daemons' settings print their URLs without passwords (logs, tracebacks)."""
    from meterd.settings import load_settings as meterd_settings

    env = {
        **_VALID,
        "NZ_DATABASE_URL": "postgresql+asyncpg://nz:pg-pass-123@127.0.0.1/nz?password=q-pass",
        "NZ_REDIS_URL": "redis://:redis-pass-456@127.0.0.1:6379/0",
        "NZ_ACCESS_LOG": "/tmp/access.log",
    }
    for settings in (load_settings(env), meterd_settings(env)):
        text = repr(settings)
        assert "127.0.0.1" in text
        for secret in ("pg-pass-123", "q-pass", "redis-pass-456", "s" * 32):
            assert secret not in text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("redis://user:pw@h/0", "redis://user:***@h/0"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("unix:///run/redis.sock?password=pw", "unix:///run/redis.sock?***"),
        ("http://[::1/broken", "***"),
    ],
)
def test_redacted_url(url: str, shown: str) -> None:
    assert redacted_url(url) == shown


def test_leases_are_sized_by_the_request_time_limit() -> None:
    """A lease outlives the longest request Caddy lets run (NZ_MAX_REQUEST_S) by a margin
    by default, and may never be shorter than it."""
    settings = load_settings({**_VALID, "NZ_MAX_REQUEST_S": "120"})
    assert settings.max_request_s == 120
    assert settings.lease_ttl_s == 135
    assert settings.concurrency_wait_s == 1.0
    with pytest.raises(SettingsError, match="NZ_LEASE_TTL_S must be at least NZ_MAX_REQUEST_S"):
        load_settings({**_VALID, "NZ_MAX_REQUEST_S": "120", "NZ_LEASE_TTL_S": "60"})
    with pytest.raises(SettingsError, match="NZ_CONCURRENCY_WAIT_MS"):
        load_settings({**_VALID, "NZ_CONCURRENCY_WAIT_MS": "99999999"})
    assert load_settings({**_VALID, "NZ_CONCURRENCY_WAIT_MS": "0"}).concurrency_wait_s == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("NZ_AUTH_TARPIT_MS", "-1"),
        ("NZ_AUTH_TARPIT_MS", "10001"),
        ("NZ_AUTH_TARPIT_MS", "1.5"),
        ("NZ_AUTH_TARPIT_MS", "1e999"),
        ("NZ_AUTH_TARPIT_CLIENT_BUDGET", "0"),
        ("NZ_AUTH_TARPIT_CLIENT_BUDGET", "-30"),
        ("NZ_AUTH_TARPIT_CLIENT_BUDGET", "lots"),
        ("NZ_AUTH_TARPIT_MAX_HELD", "0"),
        ("NZ_AUTH_TARPIT_MAX_HELD", "10001"),
        ("NZ_AUTH_TARPIT_MAX_HELD", "99999999999999999999"),
    ],
)
def test_absurd_tarpit_settings_are_refused_by_name(name: str, value: str) -> None:
    """Each tarpit setting out of range stops policyd with one line naming it."""
    with pytest.raises(SettingsError, match=name):
        load_settings({**_VALID, name: value})


def test_tarpit_defaults_and_off() -> None:
    """1 s, 30 failures per client and window, 1024 held; 0 ms turns holding off."""
    settings = load_settings(_VALID)
    assert (settings.auth_tarpit_s, settings.auth_tarpit_client_budget) == (1.0, 30)
    assert settings.auth_tarpit_max_held == 1024
    assert load_settings({**_VALID, "NZ_AUTH_TARPIT_MS": "0"}).auth_tarpit_s == 0

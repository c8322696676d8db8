"""The `neuronetz-gateway` CLI as an operator runs it: round trips and one-line errors."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import pytest

from compose.local.cli_runner import run_cli
from compose.local.processes import base_env, free_port
from policyd.authz.limits import DIMENSIONS
from policyd.cli.base import parse_when
from policyd.cli.main import parse_expiry

__all__: list[str] = []

_SECRET: Final = "cli-test-hmac-secret-0123456789abcdef"
_PREFIX: Final = re.compile(r"^nz_[a-z2-7]{8}$")
_KEY: Final = re.compile(r"^nz_[a-z2-7]{8}_[A-Za-z0-9]{43}$")
#: Each CLI start costs about a second of imports; independent failures run side by side.
_PARALLEL: Final = 3


@pytest.fixture
def cli_env(database_url: str, redis_url: str) -> dict[str, str]:
    """The environment an operator's shell would have: database, Redis and the HMAC secret."""
    return base_env(
        {"NZ_DATABASE_URL": database_url, "NZ_REDIS_URL": redis_url, "NZ_KEY_HMAC_SECRET": _SECRET}
    )


def cli(env: dict[str, str], *args: str) -> str:
    """Run a command that must succeed; its stdout."""
    return run_cli(*args, env=env).stdout


def cli_json(env: dict[str, str], *args: str) -> Any:
    """Run a command with --json that must succeed; its parsed output."""
    return json.loads(cli(env, *args, "--json"))


def parse_time(text: str) -> dt.datetime:
    """An ISO timestamp as the CLI prints it (UTC, `Z`)."""
    assert text.endswith("Z"), text
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def run_failing(
    env: dict[str, str], commands: Sequence[tuple[str, ...]]
) -> list[subprocess.CompletedProcess[str]]:
    """Run independent commands that are expected to fail, a few at a time, in order."""
    with ThreadPoolExecutor(max_workers=_PARALLEL) as pool:
        return list(pool.map(lambda args: run_cli(*args, env=env, check=False), commands))


def assert_one_line_error(done: subprocess.CompletedProcess[str], fragment: str) -> str:
    """Non-zero exit, nothing on stdout, exactly one stderr line containing `fragment`."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0, (done.args, done.stdout)
    assert len(lines) == 1, (done.args, done.stderr)
    assert fragment in lines[0], (done.args, lines[0])
    assert done.stdout == "", (done.args, done.stdout)
    assert "Traceback" not in done.stderr
    return lines[0]


def test_tenants_round_trip(cli_env: dict[str, str]) -> None:
    """create-tenant then list-tenants shows each tenant with its id and key count."""
    assert re.match(
        r"^created tenant acme \([0-9a-f-]{36}\)$",
        cli(cli_env, "create-tenant", "--name", "acme").strip(),
    )
    beta = cli_json(cli_env, "create-tenant", "--name", "beta.team-2")
    assert beta["name"] == "beta.team-2"
    assert beta["keys"] == 0
    parse_time(beta["created_at"])
    cli(cli_env, "create-key", "--tenant", "acme", "--name", "one")
    listed = cli_json(cli_env, "list-tenants")
    assert [(t["name"], t["keys"]) for t in listed] == [("acme", 1), ("beta.team-2", 0)]
    assert listed[1]["id"] == beta["id"]
    table = cli(cli_env, "list-tenants")
    assert "acme" in table
    assert "beta.team-2" in table


def test_create_key_shows_the_key_exactly_once(cli_env: dict[str, str]) -> None:
    """create-key prints the full key once; list-keys never shows it or its hash."""
    cli(cli_env, "create-tenant", "--name", "acme")
    made = run_cli("create-key", "--tenant", "acme", "--name", "laptop", env=cli_env)
    key = made.stdout.strip()
    assert _KEY.match(key), made.stdout
    assert made.stdout.count(key) == 1
    assert key not in made.stderr
    assert key[:11] in made.stderr
    assert "cannot be shown again" in made.stderr

    created = cli_json(cli_env, "create-key", "--tenant", "acme", "--name", "ci")
    assert set(created) >= {"key", "prefix", "tenant"}
    assert _KEY.match(created["key"])
    assert _PREFIX.match(created["prefix"])
    assert created["key"].startswith(created["prefix"] + "_")
    assert created["tenant"] == "acme"
    assert created["name"] == "ci"
    assert created["expires_at"] is None

    listed = cli_json(cli_env, "list-keys")
    assert [(k["prefix"], k["name"], k["tenant"], k["status"]) for k in listed] == [
        (key[:11], "laptop", "acme", "active"),
        (created["prefix"], "ci", "acme", "active"),
    ]
    assert listed[1]["id"] == created["id"]
    assert cli_json(cli_env, "list-keys", "--tenant", "acme") == listed
    for output in (json.dumps(listed), cli(cli_env, "list-keys")):
        for secret in (key, created["key"], key[12:], created["key"][12:]):
            assert secret not in output
        assert "$argon2" not in output
        assert "argon2" not in output.lower()


def test_create_key_accepts_durations_dates_and_iso_expiries(cli_env: dict[str, str]) -> None:
    """--expires takes 30d, a date (end of that day, UTC) or an ISO datetime with any offset."""
    cli(cli_env, "create-tenant", "--name", "acme")
    before = dt.datetime.now(dt.UTC)
    in_30d = cli_json(cli_env, "create-key", "--tenant", "acme", "--name", "d", "--expires", "30d")
    expected = before + dt.timedelta(days=30)
    assert abs(parse_time(in_30d["expires_at"]) - expected) < dt.timedelta(minutes=1)
    cases = {
        "2099-01-31": "2099-01-31T23:59:59.999999Z",
        "2099-06-01T14:00:00+02:00": "2099-06-01T12:00:00Z",
    }
    for i, (given, stored) in enumerate(cases.items()):
        made = cli_json(
            cli_env, "create-key", "--tenant", "acme", "--name", f"k{i}", "--expires", given
        )
        assert parse_time(made["expires_at"]) == parse_time(stored), given
    listed = {k["name"]: k for k in cli_json(cli_env, "list-keys")}
    assert parse_time(listed["d"]["expires_at"]) == parse_time(in_30d["expires_at"])
    assert parse_time(listed["k0"]["expires_at"]) == parse_time("2099-01-31T23:59:59.999999Z")
    assert all(k["status"] == "active" for k in listed.values())
    # The other spellings go through the same parser; checked in-process to save key hashing.
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    assert parse_expiry("12h", now=now) == now + dt.timedelta(hours=12)
    assert parse_expiry("2w", now=now) == now + dt.timedelta(weeks=2)
    assert parse_expiry("2099-06-01T12:00:00Z", now=now) == dt.datetime(
        2099, 6, 1, 12, tzinfo=dt.UTC
    )
    assert parse_expiry("2099-06-01T12:00:00", now=now) == dt.datetime(
        2099, 6, 1, 12, tzinfo=dt.UTC
    )


@pytest.mark.parametrize(
    ("text", "ahead", "expected"),
    [
        ("30m", True, dt.datetime(2030, 1, 1, 0, 30, tzinfo=dt.UTC)),
        ("24h", False, dt.datetime(2029, 12, 31, tzinfo=dt.UTC)),
        # A date looking ahead (an expiry) lasts through that day; looking back, it starts it.
        ("2030-02-01", True, dt.datetime.combine(dt.date(2030, 2, 1), dt.time.max, dt.UTC)),
        ("2029-12-01", False, dt.datetime(2029, 12, 1, tzinfo=dt.UTC)),
        (" 2029-12-01T06:00:00+02:00 ", False, dt.datetime(2029, 12, 1, 4, tzinfo=dt.UTC)),
        ("yesterday", False, None),
        ("12x", True, None),
        ("2029-13-01", True, None),
    ],
)
def test_moments_read_both_ways(text: str, ahead: bool, expected: dt.datetime | None) -> None:
    """Expiries (ahead) and --since/--until (back) share one reader of durations and dates."""
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    assert parse_when(text, ahead=ahead, now=now) == expected


def test_revoke_key_is_idempotent(cli_env: dict[str, str]) -> None:
    """revoke-key marks the key revoked; repeating it succeeds and keeps the first time."""
    cli(cli_env, "create-tenant", "--name", "acme")
    prefix = cli_json(cli_env, "create-key", "--tenant", "acme", "--name", "k")["prefix"]
    first = cli_json(cli_env, "revoke-key", "--prefix", prefix)
    assert first["status"] == "revoked"
    assert first["prefix"] == prefix
    again = cli_json(cli_env, "revoke-key", "--prefix", prefix)
    assert again["status"] == "revoked"
    assert again["revoked_at"] == first["revoked_at"]
    text = cli(cli_env, "revoke-key", "--prefix", prefix)
    assert text.strip() == f"revoked key {prefix} (k) of tenant acme"
    (listed,) = cli_json(cli_env, "list-keys")
    assert listed["status"] == "revoked"


def test_limits_round_trip(cli_env: dict[str, str]) -> None:
    """set-limits, show-limits and usage agree on values and where each comes from."""
    cli(cli_env, "create-tenant", "--name", "acme")
    prefix = cli_json(cli_env, "create-key", "--tenant", "acme", "--name", "k")["prefix"]
    views = cli_json(
        cli_env, "set-limits", "--key", prefix, "--rpm", "10", "--models", "llama3.2, qwen2.5"
    )
    by_name = {v["name"]: v for v in views}
    assert by_name["rpm"] == {"name": "rpm", "value": 10, "source": "key", "tenant_cap": None}
    assert by_name["allowed_models"]["value"] == ["llama3.2", "qwen2.5"]
    assert by_name["tpm"]["source"] == "unset"

    tenant = {
        v["name"]: v
        for v in cli_json(cli_env, "set-limits", "--tenant", "acme", "--tpm", "1000", "--rpm", "20")
    }
    assert (tenant["rpm"]["value"], tenant["rpm"]["source"]) == (20, "tenant")
    assert tenant["allowed_models"]["source"] == "unset"
    shown = {v["name"]: v for v in cli_json(cli_env, "show-limits", "--key", prefix)}
    assert (shown["rpm"]["value"], shown["rpm"]["source"], shown["rpm"]["tenant_cap"]) == (
        10,
        "key",
        20,
    )
    assert (shown["tpm"]["value"], shown["tpm"]["source"]) == (1000, "tenant")

    usage = cli_json(cli_env, "usage", "--key", prefix)["live"]
    assert [u["name"] for u in usage] == list(DIMENSIONS)
    used = {u["name"]: u["used"] for u in usage}
    # Concurrency has no limit here, so admission keeps no leases to count.
    assert used == {name: None if name == "concurrency" else 0 for name in DIMENSIONS}
    assert {u["name"]: u["limit"] for u in usage}["rpm"] == 10

    unset = cli_json(cli_env, "set-limits", "--key", prefix, "--unset", "rpm", "--unset", "models")
    shown = {v["name"]: v for v in unset}
    assert (shown["rpm"]["value"], shown["rpm"]["source"]) == (20, "tenant")
    assert shown["allowed_models"]["source"] == "unset"
    table = cli(cli_env, "show-limits", "--key", prefix)
    assert "rpm" in table
    assert "tenant" in table


def test_every_error_is_one_line_and_a_non_zero_exit(cli_env: dict[str, str]) -> None:
    """Unknown or duplicate names, bad prefixes and bad expiries each fail with one clear line."""
    cli(cli_env, "create-tenant", "--name", "acme")
    cli(cli_env, "create-key", "--tenant", "acme", "--name", "taken")
    cases: list[tuple[tuple[str, ...], str]] = [
        (("create-key", "--tenant", "nope", "--name", "k"), "unknown tenant 'nope'"),
        (("list-keys", "--tenant", "nope"), "unknown tenant 'nope'"),
        (("create-tenant", "--name", "acme"), "tenant 'acme' already exists"),
        (("create-key", "--tenant", "acme", "--name", "taken"), "already has a key named 'taken'"),
        (("create-tenant", "--name", "Bad Name"), "invalid tenant name"),
        (("create-tenant", "--name", "-dash"), "invalid tenant name"),
        (("revoke-key", "--prefix", "bogus"), "invalid key prefix 'bogus'"),
        (("revoke-key", "--prefix", "nz_ABCDEFGH"), "invalid key prefix"),
        (("revoke-key", "--prefix", "nz_abcdefgh"), "no key with prefix 'nz_abcdefgh'"),
        (("show-limits", "--key", "nz_abcdefgh"), "no key with prefix 'nz_abcdefgh'"),
        (
            ("create-key", "--tenant", "acme", "--name", "old", "--expires", "2020-01-01"),
            "the expiry must be in the future",
        ),
        (
            ("create-key", "--tenant", "acme", "--name", "old", "--expires", "-5d"),
            "invalid expiry '-5d'",
        ),
        (
            ("create-key", "--tenant", "acme", "--name", "bad", "--expires", "next tuesday"),
            "invalid expiry 'next tuesday'",
        ),
    ]
    # --json changes the output of a success, not of a failure.
    cases += [((*args, "--json"), fragment) for args, fragment in cases[::4]]
    outcomes = run_failing(cli_env, [args for args, _ in cases])
    for (_args, fragment), done in zip(cases, outcomes, strict=True):
        assert assert_one_line_error(done, fragment).startswith("error: ")
    # None of the failed commands changed anything.
    assert [k["name"] for k in cli_json(cli_env, "list-keys")] == ["taken"]
    assert [t["name"] for t in cli_json(cli_env, "list-tenants")] == ["acme"]


def test_tenant_name_with_a_trailing_newline_is_refused(cli_env: dict[str, str]) -> None:
    """A tenant name ending in a line break is invalid, like any other character outside the set."""
    done = run_cli("create-tenant", "--name", "acme\n", env=cli_env, check=False)
    assert_one_line_error(done, "invalid tenant name")


def test_unreachable_or_unset_database_is_one_line_without_the_password(
    cli_env: dict[str, str],
) -> None:
    """A closed port names host:port but never the password; an unset URL says so."""
    port = free_port()
    password = "Sup3r-Secret-Pw"
    env = {
        **cli_env,
        "NZ_DATABASE_URL": f"postgresql+asyncpg://neuronetz:{password}@127.0.0.1:{port}/neuronetz",
    }
    commands = [
        ("list-tenants",),
        ("create-key", "--tenant", "acme", "--name", "k", "--json"),
        ("revoke-key", "--prefix", "nz_abcdefgh"),
    ]
    for done in run_failing(env, commands):
        line = assert_one_line_error(done, f"127.0.0.1:{port}")
        assert password not in done.stderr
        assert "neuronetz:" not in line
    unset = {k: v for k, v in cli_env.items() if k != "NZ_DATABASE_URL"}
    for done in run_failing(unset, [("list-tenants",), ("create-tenant", "--name", "acme")]):
        assert_one_line_error(done, "NZ_DATABASE_URL is not set")

"""Every CLI command driven with extreme operator values: it succeeds, or it says why in
one line with a non-zero exit, no traceback and nothing half-written."""

from __future__ import annotations

import asyncio
import contextlib
import io
import subprocess
from typing import Final, Literal

import asyncpg  # type: ignore[import-untyped]
import click
import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from compose.local.cli_runner import run_cli
from compose.local.processes import base_env
from policyd.cli.main import cli
from policyd.cli.main import run_cli as run_in_process
from policyd.shared.bounds import INT4_MAX, MAX_PROMPT_RETENTION_DAYS, MAX_TOKENS

__all__: list[str] = []

_SECRET: Final = "cli-test-hmac-secret-0123456789abcdef"

#: Whole numbers around every boundary a column or a bound has, and far beyond.
_EDGES: Final = (-1, 0, 1, INT4_MAX, INT4_MAX + 1, MAX_TOKENS, MAX_TOKENS + 1, 2**63 - 1, 2**63)
_INTS: Final = st.one_of(
    st.sampled_from(_EDGES), st.integers(min_value=-(2**70), max_value=2**70)
).map(str)
_SURROGATES: Final[tuple[Literal["Cs"]]] = ("Cs",)
#: Text an operator can type, including invalid UTF-8 (which Python reads as lone
#: surrogates), control characters and very long values.
_TEXT: Final = st.one_of(
    st.text(
        alphabet=st.characters(
            blacklist_categories=_SURROGATES, blacklist_characters="\x00", max_codepoint=0x2FFFF
        ),
        max_size=40,
    ),
    st.sampled_from(["\udcff\udc80", "a\nb", " ", "x" * 5000, "acme", "-", "--json"]),
)
#: Moments: durations and dates at and beyond every bound, and plain garbage.
_MOMENTS: Final = st.one_of(
    st.sampled_from(
        [
            "999999999d",
            "99999999999d",
            "999999999999h",
            "9" * 40 + "s",
            "36500d",
            "36501d",
            "0s",
            "1s",
            "9999-12-31",
            "0001-01-01",
            "9999-12-31T23:59:59-23:59",
            "0001-01-01T00:00:00+23:59",
            "2026-02-30",
            "-1d",
            "1e9d",
            "",
            "infinity",
        ]
    ),
    _TEXT,
)

_MOMENT_OPTIONS: Final = frozenset({"--since", "--until", "--expires"})
#: Values that reach existing rows, so that some commands get past the lookups.
_KNOWN: Final = {"--tenant": "acme"}


def _strategy(option: click.Option) -> st.SearchStrategy[str] | None:
    """Values for one option, by its type: None for a flag."""
    name = option.opts[0]
    if option.is_flag:
        return None
    if name in _MOMENT_OPTIONS:
        return _MOMENTS
    if isinstance(option.type, click.IntRange | click.types.IntParamType):
        return _INTS
    if isinstance(option.type, click.Choice):
        return st.one_of(st.sampled_from([str(c) for c in option.type.choices]), _TEXT)
    if name in _KNOWN:
        return st.one_of(st.just(_KNOWN[name]), _TEXT)
    return _TEXT


#: Every command of the CLI and its options (read from the CLI itself, so a new command
#: or option is driven too): option -> strategy of its value (None: a flag).
_COMMANDS: Final[dict[str, dict[str, st.SearchStrategy[str] | None]]] = {
    name: {
        param.opts[0]: _strategy(param)
        for param in command.params
        if isinstance(param, click.Option) and param.opts[0] not in ("--help", "--json")
    }
    for name, command in cli.commands.items()
}

#: What an operator's command may change; compared around every failing command.
_STATE: Final = """
SELECT 'tenant', t.name, row_to_json(t)::text FROM tenants t
UNION ALL
SELECT 'key', k.prefix, (row_to_json(k)::jsonb - 'last_used_at')::text FROM api_keys k
ORDER BY 1, 2
"""


@pytest.fixture
def operator_env(database_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The operator's environment in this process, and a tenant `acme` with one key."""
    env = {"NZ_DATABASE_URL": database_url, "NZ_REDIS_URL": redis_url}
    for name, value in {**env, "NZ_KEY_HMAC_SECRET": _SECRET}.items():
        monkeypatch.setenv(name, value)
    run_cli("create-tenant", "--name", "acme", env=base_env({**env}))
    run_cli("create-key", "--tenant", "acme", "--name", "k", env=base_env({**env}))
    return database_url.replace("postgresql+asyncpg://", "postgresql://")


def _state(dsn: str) -> list[tuple[str, ...]]:
    async def read() -> list[tuple[str, ...]]:
        conn = await asyncpg.connect(dsn)
        try:
            return [tuple(row) for row in await conn.fetch(_STATE)]
        finally:
            await conn.close()

    return asyncio.run(read())


def _invoke(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_in_process(args)
    return code, out.getvalue(), err.getvalue()


@st.composite
def _command_line(draw: st.DrawFn, command: str) -> list[str]:
    args = [command]
    options = _COMMANDS[command]
    chosen = draw(st.lists(st.sampled_from(sorted(options)), unique=True)) if options else []
    for option in chosen:
        strategy = options[option]
        args.append(option)
        if strategy is not None:
            args.append(draw(strategy))
    if draw(st.booleans()):
        args.append("--json")
    return args


def _check(args: list[str], dsn: str) -> None:
    before = _state(dsn)
    code, out, err = _invoke(args)
    assert "Traceback" not in err, (args, err)
    if code == 0:
        return
    lines = err.strip().splitlines()
    assert code in (1, 2), (args, code, err)
    assert len(lines) == 1, (args, err)
    assert lines[0].startswith("error: "), (args, err)
    assert out == "", (args, out)
    assert _state(dsn) == before, ("a failed command changed the stores", args)


def test_every_command_is_driven() -> None:
    """The property test below covers every command the CLI has, with all its options."""
    assert set(_COMMANDS) >= {"create-key", "set-limits", "audit", "usage", "prune-prompts"}
    assert "--max-num-ctx" in _COMMANDS["set-limits"]


@pytest.mark.parametrize("command", sorted(_COMMANDS))
def test_every_command_takes_extreme_values_cleanly(operator_env: str, command: str) -> None:
    """Any mix of a command's options with boundary, huge, negative and garbage values:
    exit 0, or one `error:` line, exit 1 or 2, nothing on stdout and the stores untouched."""

    @settings(
        max_examples=25 if command != "create-key" else 12,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(args=_command_line(command))
    def run(args: list[str]) -> None:
        _check(args, operator_env)

    run()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["create-key", "--tenant", "acme", "--name", "x", "--expires", "999999999d"], "expiry"),
        (["create-key", "--tenant", "acme", "--name", "x", "--expires", "9999-12-31"], "expiry"),
        (["usage", "--since", "99999999999d"], "--since"),
        (["audit", "--since", "999999999999h"], "--since"),
        (["set-limits", "--tenant", "acme", "--rpm", "2147483648"], "--rpm"),
        (["set-limits", "--tenant", "acme", "--daily-tokens", "9223372036854775808"], "daily"),
        (
            ["set-limits", "--tenant", "acme", "--prompt-retention-days", "100000000"],
            "retention",
        ),
        (["set-limits", "--tenant", "acme", "--models", "a b"], "model"),
        (["audit", "--status", "99"], "status"),
        (["list-keys", "--tenant", "\udcff"], "UTF-8"),
    ],
)
def test_the_reported_values_are_one_line_and_exit_2(
    operator_env: str, database_url: str, redis_url: str, args: list[str], fragment: str
) -> None:
    """The values of the report, run as an operator runs the tool: exit 2, one line."""
    before = _state(operator_env)
    env = base_env(
        {"NZ_DATABASE_URL": database_url, "NZ_REDIS_URL": redis_url, "NZ_KEY_HMAC_SECRET": _SECRET}
    )
    done: subprocess.CompletedProcess[str] = run_cli(*args, env=env, check=False)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (args, done.stderr)
    assert len(lines) == 1, (args, done.stderr)
    assert fragment in lines[0], (args, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
    assert _state(operator_env) == before


def test_the_largest_accepted_values_are_stored(operator_env: str) -> None:
    """The maxima themselves are accepted and shown back as set."""
    code, out, err = _invoke(
        [
            "set-limits",
            "--tenant",
            "acme",
            "--rpm",
            str(INT4_MAX),
            "--daily-tokens",
            str(MAX_TOKENS),
            "--prompt-retention-days",
            str(MAX_PROMPT_RETENTION_DAYS),
        ]
    )
    assert code == 0, err
    assert str(MAX_TOKENS) in out
    assert str(INT4_MAX) in out

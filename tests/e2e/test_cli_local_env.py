"""The CLI without ceremony: inside a checkout after `make up`, with a clean environment."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import pytest

from compose.local.parts import Stack
from compose.local.services import REPO_ROOT
from compose.local.up import write_cli_env
from tests.e2e.conftest import make_key

README: Final = REPO_ROOT / "README.md"
#: What `uv run X …` does inside the checkout, without letting uv touch any environment.
UV_SHIM: Final = '#!/bin/sh\n[ "$1" = run ] || exit 97\nshift\nexec "$@"\n'


def readme_cli_block() -> str:
    """The bash block of the README's CLI section, as an operator would copy it."""
    text = README.read_text()
    section = text[text.index("## The CLI") :]
    match = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert match, "the README's CLI section has no bash block"
    return match.group(1)


@pytest.fixture
def checkout(stack: Stack, tmp_path: Path) -> Path:
    """A checkout after `make up`: pyproject.toml and `.run/cli.env` as make up writes it."""
    root = tmp_path / "checkout"
    (root / ".run").mkdir(parents=True)
    (root / "docs").mkdir()
    shutil.copy(REPO_ROOT / "pyproject.toml", root / "pyproject.toml")
    write_cli_env(stack, root / ".run" / "cli.env")
    make_key(stack, tenant="demo", name="demo-for-readme")  # `make up` creates tenant demo
    return root


def clean_env(tmp_path: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """PATH with the venv's console scripts and a `uv` shim; HOME; nothing else."""
    shims = tmp_path / "shims"
    shims.mkdir(exist_ok=True)
    uv = shims / "uv"
    uv.write_text(UV_SHIM)
    uv.chmod(0o755)
    venv_bin = Path(sys.executable).parent
    return {"PATH": f"{shims}:{venv_bin}:/usr/bin:/bin", "HOME": str(tmp_path), **(extra or {})}


def cli(cwd: Path, env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "neuronetz-gateway"), *args],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_readme_cli_section_runs_as_written(checkout: Path, tmp_path: Path) -> None:
    """Every line of the README's CLI block succeeds, in a subdirectory, with no NZ_* set."""
    script = "set -euo pipefail\n" + readme_cli_block()
    done = subprocess.run(
        ["/bin/bash", "-c", script],
        cwd=checkout / "docs",
        env=clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if line.startswith("note: no NZ_*")]
    assert notes, done.stderr
    assert all(str(checkout / ".run" / "cli.env") in line for line in notes)
    assert "revoked key nz_" in done.stdout


def test_one_line_on_stderr_and_json_stays_clean(checkout: Path, tmp_path: Path) -> None:
    """The note is exactly one stderr line; stdout is still pure JSON."""
    done = cli(checkout, clean_env(tmp_path), "list-tenants", "--json")
    assert done.returncode == 0, done.stderr
    assert done.stdout.lstrip().startswith("[")
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("note: no NZ_* variables set")


def test_environment_wins_over_the_local_file(checkout: Path, tmp_path: Path) -> None:
    """Any NZ_* set: the file is ignored (here the env points at a closed port and fails)."""
    env = clean_env(tmp_path, {"NZ_DATABASE_URL": "postgresql+asyncpg://u:p@127.0.0.1:9/x"})
    done = cli(checkout, env, "list-tenants")
    assert done.returncode == 1
    assert "note:" not in done.stderr
    assert "127.0.0.1:9/x" in done.stderr
    assert ":p@" not in done.stderr  # never the password


def test_partial_environment_does_not_mix_with_the_file(checkout: Path, tmp_path: Path) -> None:
    """NZ_REDIS_URL alone: no database from the file, one clear error."""
    env = clean_env(tmp_path, {"NZ_REDIS_URL": "redis://127.0.0.1:9/0"})
    done = cli(checkout, env, "list-tenants")
    assert done.returncode == 1
    assert "NZ_DATABASE_URL is not set" in done.stderr


def test_outside_a_checkout_it_says_what_to_set(tmp_path: Path) -> None:
    """No checkout, no NZ_*: the error names the variable and the local-stack way."""
    done = cli(tmp_path, clean_env(tmp_path), "list-tenants")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "NZ_DATABASE_URL is not set" in done.stderr
    assert "make up" in done.stderr


def test_a_file_others_can_write_is_ignored(checkout: Path, tmp_path: Path) -> None:
    """A group- or world-writable cli.env could redirect the CLI: it is not used."""
    (checkout / ".run" / "cli.env").chmod(0o666)
    done = cli(checkout, clean_env(tmp_path), "list-tenants")
    assert done.returncode == 1
    assert "ignoring" in done.stderr
    assert "NZ_DATABASE_URL is not set" in done.stderr


def test_the_file_is_data_never_shell(checkout: Path, tmp_path: Path) -> None:
    """Command substitutions and non-NZ names in cli.env are never run or applied."""
    marker = tmp_path / "pwned"
    env_file = checkout / ".run" / "cli.env"
    env_file.write_text(
        env_file.read_text()
        + f"PATH=/nonexistent\nNZ_OLLAMA_URL=$(touch {marker})\nNZ_X=`touch {marker}`\n"
    )
    done = cli(checkout, clean_env(tmp_path), "list-tenants", "--json")
    assert done.returncode == 0, done.stderr
    assert not marker.exists()

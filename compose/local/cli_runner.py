"""Run the `neuronetz-gateway` admin CLI as a subprocess, the way an operator would."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from compose.local.services import REPO_ROOT

__all__ = ["CliError", "cli_binary", "run_cli", "run_cli_json"]


class CliError(RuntimeError):
    """The CLI exited non-zero; the message carries its stderr."""


def cli_binary() -> Path:
    """The console script installed into the venv by `uv sync`."""
    return Path(sys.executable).parent / "neuronetz-gateway"


def run_cli(
    *args: str, env: Mapping[str, str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the CLI with exactly `env`; raise CliError on failure unless `check` is False."""
    done = subprocess.run(
        [str(cli_binary()), *args],
        env=dict(env),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check and done.returncode != 0:
        raise CliError(
            f"neuronetz-gateway {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}"
        )
    return done


def run_cli_json(*args: str, env: Mapping[str, str]) -> Any:
    """Run the CLI with `--json` and return the parsed output."""
    return json.loads(run_cli(*args, "--json", env=env).stdout)

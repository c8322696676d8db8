"""`python -m compose.standin --host H --port P [...]`: exec Granian on the stand-in.

One entry point for the test harness and `make up`. The process is replaced by Granian
(same PID), so whoever started it can stop it by that PID.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final, NoReturn

from compose.standin.models import Catalogue
from compose.standin.settings import (
    ENV_FIRST_TOKEN_MS,
    ENV_MODELS,
    ENV_TOKENS_PER_S,
    StandinSettings,
)

__all__ = ["FACTORY", "granian_argv", "main"]

#: Granian's import target for the application factory.
FACTORY: Final = "compose.standin.app:create_app"
#: The repository root, where `tests` is importable from.
_REPO_ROOT: Final = Path(__file__).resolve().parents[3]


def granian_argv(*, host: str, port: int) -> list[str]:
    """The Granian command line serving the stand-in (one worker, ASGI, factory)."""
    beside_python = Path(sys.executable).with_name("granian")
    launcher = [str(beside_python)] if beside_python.exists() else [sys.executable, "-m", "granian"]
    return [
        *launcher,
        "--interface", "asgi",
        "--factory",
        "--host", host,
        "--port", str(port),
        "--workers", "1",
        "--working-dir", str(_REPO_ROOT),
        "--no-ws",
        FACTORY,
    ]  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m compose.standin",
        description="Serve the Ollama stand-in with Granian.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="TCP port to bind")
    parser.add_argument(
        "--tokens-per-s",
        type=float,
        default=None,
        help=f"sets {ENV_TOKENS_PER_S} (<= 0: no pacing)",
    )
    parser.add_argument(
        "--first-token-ms", type=float, default=None, help=f"sets {ENV_FIRST_TOKEN_MS}"
    )
    parser.add_argument("--models", default=None, help=f"sets {ENV_MODELS} (comma-separated)")
    return parser


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Parse the options into NZ_STANDIN_* and exec Granian."""
    parser = _parser()
    args = parser.parse_args(argv)
    env = dict(os.environ)
    if args.tokens_per_s is not None:
        env[ENV_TOKENS_PER_S] = repr(args.tokens_per_s)
    if args.first_token_ms is not None:
        env[ENV_FIRST_TOKEN_MS] = repr(args.first_token_ms)
    if args.models is not None:
        env[ENV_MODELS] = args.models
    try:  # fail here, readably, rather than in Granian's worker
        Catalogue.from_names(StandinSettings.from_env(env).models)
    except ValueError as exc:
        parser.error(str(exc))
    # Make `tests` importable in the worker whatever the caller's working directory.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
    command = granian_argv(host=args.host, port=args.port)
    sys.stdout.flush()
    os.execve(command[0], command, env)  # noqa: S606 - become Granian, keeping our PID # nosec B606


if __name__ == "__main__":
    main()

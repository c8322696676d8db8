"""`start-policyd`: policyd under Granian on its unix socket, the one place its command line is.

The production image, `make up`, the tests and the bench all start policyd from
`granian_argv`; `main` reads NZ_POLICYD_SOCKET, NZ_MAX_BODY_BYTES, NZ_POLICYD_WORKERS and
NZ_AUTH_TARPIT_MAX_HELD, removes a stale socket, lifts the open-files limit and replaces
itself with Granian (policyd reads its other NZ_* settings itself). Several workers get a
fresh PROMETHEUS_MULTIPROC_DIR (metrics.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from policyd.authz.settings import DEFAULT_MAX_BODY_BYTES, DEFAULT_TARPIT_MAX_HELD
from policyd.shared.envreader import EnvReader

__all__ = ["APP", "backpressure", "buffer_size", "granian_argv", "main"]

#: The ASGI factory Granian serves.
APP: Final = "policyd.authz.app:create_app"
_HEADER_ROOM: Final = 65_536
#: Requests a worker takes on beside the refusals the tarpit may be holding.
_ANSWERING: Final = 1024
#: Open files policyd asks for (up to the hard limit).
_OPEN_FILES: Final = 65_536
_EXIT_CONFIG: Final = 2


def buffer_size(max_body_bytes: int) -> int:
    """Granian's HTTP/1 buffer: Caddy sends the body base64-encoded in one header (4/3 of
    its size), and Granian must hold it plus the other headers, or it answers 431."""
    return math.ceil(max_body_bytes * 4 / 3) + _HEADER_ROOM


def backpressure(max_held: int) -> int:
    """Granian's requests at once per worker: the tarpit's held refusals (authz/tarpit.py)
    must never take the slots the requests being answered need (Granian's default is
    1024 / workers)."""
    return max_held + _ANSWERING


def granian_argv(
    granian: str,
    *,
    socket_path: Path,
    max_body_bytes: int,
    app: str = APP,
    workers: int = 1,
    max_held: int = DEFAULT_TARPIT_MAX_HELD,
) -> list[str]:
    """Granian's command line for policyd on `socket_path`."""
    return [
        granian,
        "--interface", "asgi",
        "--factory",
        "--uds", str(socket_path),
        "--uds-permissions", "0660",
        "--workers", str(workers),
        "--http1-buffer-size", str(buffer_size(max_body_bytes)),
        "--backpressure", str(backpressure(max_held)),
        "--backlog", str(backpressure(max_held)),
        app,
    ]  # fmt: skip


def _lift_open_files() -> None:
    """Soft open-files limit up to the hard one: each request Caddy has in flight, held
    refusals included, is a connection on the socket (a soft limit of 1024 is common)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, _OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):  # a lower limit is not fatal
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main(env: Mapping[str, str] | None = None) -> None:
    """Check the settings this needs, then exec Granian."""
    read = EnvReader(os.environ if env is None else env)
    socket_path = read.required("NZ_POLICYD_SOCKET")
    max_body = read.number("NZ_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, integer=True)
    workers = int(read.number("NZ_POLICYD_WORKERS", 1, integer=True))
    max_held = int(read.number("NZ_AUTH_TARPIT_MAX_HELD", DEFAULT_TARPIT_MAX_HELD, integer=True))
    if read.errors:
        print(f"start-policyd: {'; '.join(read.errors)}", file=sys.stderr)
        raise SystemExit(_EXIT_CONFIG)
    granian = shutil.which("granian") or str(Path(sys.executable).with_name("granian"))
    # A stale socket from a previous container or a killed run would make Granian fail to bind.
    Path(socket_path).unlink(missing_ok=True)
    if workers > 1:
        # Several worker processes: prometheus_client keeps each one's metrics in files of
        # a fresh directory per run, and /metrics sums them (a reused one would add old runs).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="nz-policyd-metrics-")
    _lift_open_files()
    argv = granian_argv(
        granian,
        socket_path=Path(socket_path),
        max_body_bytes=int(max_body),
        workers=workers,
        max_held=max_held,
    )
    os.execv(granian, argv)  # noqa: S606 - a fixed program with our own arguments # nosec B606


if __name__ == "__main__":
    main()

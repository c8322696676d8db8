"""`meterd`: run the meter daemon; `meterd --check`: is this node's meter alive?

The only place that configures logging: one JSON object per line on stderr (plain text
on a terminal). Exit codes: 0 clean stop / fresh heartbeat, 1 stale heartbeat or a
crash, 2 bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Final

import uvloop

from meterd import daemon, health
from meterd.settings import SettingsError, load_settings

__all__ = ["main"]

_EXIT_CONFIG: Final = 2


class _JsonFormatter(logging.Formatter):
    """One JSON object per record: machines read the daemon's log, not people."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _stop_before_running(signum: int, _frame: FrameType | None) -> None:
    # A stop that arrives while meterd is still starting: nothing is settled yet, so
    # leaving now is as clean as a drained stop. The daemon installs its own handler.
    sys.exit(0)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _stop_before_running)
    parser = argparse.ArgumentParser(
        prog="meterd",
        description="Settle usage and write the audit from Caddy's JSON access log.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 0 if this node's heartbeat is fresh, 1 if it is stale or missing",
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings(os.environ)
    except SettingsError as exc:
        print(f"meterd: {exc}", file=sys.stderr)
        sys.exit(_EXIT_CONFIG)
    if args.check:
        sys.exit(asyncio.run(health.run_check(settings)))
    _configure_logging(settings.log_level)
    logging.getLogger("meterd").info(
        "meterd starting: node %s, log %s", settings.node, settings.access_log
    )
    # What is loaded by now lives as long as the process: spare the collector from
    # scanning it again and again while batches churn through short-lived objects.
    gc.collect()
    gc.freeze()
    # uvloop: each round trip to Postgres or Redis costs half the CPU of asyncio's loop.
    sys.exit(uvloop.run(daemon.run(settings)))


if __name__ == "__main__":
    main()

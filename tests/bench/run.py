"""`uv run python -m tests.bench.run [--quick]`: run every scenario, print a table, write JSON.

Starts its own Postgres, Redis, stand-ins, policyd and Caddys on free local ports (see
`rig.py`) and stops them all by PID at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

import attrs

from compose.local.services import REPO_ROOT
from tests.bench.attack import under_attack
from tests.bench.load import wrk_binary, wrk_script
from tests.bench.metering import NOT_IN_STACK, LagSamples, meterd_throughput
from tests.bench.metrics_cost import metrics_cost
from tests.bench.plan import FULL, QUICK, SMOKE, Plan
from tests.bench.policyd_alone import policyd_alone
from tests.bench.report import headline, render_table, verdicts, write_json
from tests.bench.resources import rss_mib
from tests.bench.rig import BenchRig, RigConfig, make_keys
from tests.bench.scenarios import small_requests, streams
from tests.bench.sidebyside import normalisation, surfaces
from tests.bench.workload import Workload

__all__ = ["main", "run"]

DEFAULT_OUT: Final = REPO_ROOT / ".bench" / "latest.json"
_PLANS: Final = {"full": FULL, "quick": QUICK, "smoke": SMOKE}


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the Ctrl-C path, so the rig stops every process it started.
    raise KeyboardInterrupt(f"received signal {signum}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


_T0: Final = time.monotonic()


def _say(message: str) -> None:
    print(f"[bench {time.monotonic() - _T0:5.1f}s] {message}", file=sys.stderr, flush=True)


def run(plan: Plan) -> dict[str, Any]:
    """Run every scenario of `plan` against a freshly started rig; returns the results."""
    wrk_binary()  # fail before starting anything if wrk is missing
    began = time.monotonic()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    loadavg_start = [round(v, 2) for v in os.getloadavg()]
    scenarios: dict[str, Any] = {}
    rig = BenchRig(
        RigConfig(
            stream_tokens_per_s=plan.stream_tokens_per_s,
            stream_first_token_ms=plan.stream_first_token_ms,
        )
    )
    _say(f"starting the parts under {rig.base_dir}")
    with rig:
        work = Workload(key=make_keys(rig, names=["bench"])[0])
        script = rig.base_dir / "small.lua"
        script.write_text(wrk_script(work.small(), headers=work.headers))
        lag = LagSamples(rig) if rig.meterd_in_stack else None
        _say("1. small requests: direct, Caddy only, gateway")
        scenarios["small"] = small_requests(
            rig, plan, work, script=script, sampler=lag.sample if lag else None
        )
        _say("2. streams")
        scenarios["streams"] = streams(rig, plan, work)
        _say("3. policyd alone")
        scenarios["policyd"] = policyd_alone(rig, plan, work)
        _say("6. normalisation: with and without the upstream body")
        scenarios["normalisation"] = normalisation(rig, plan, work)
        _say("7. surfaces: /api and /v1 through each hop")
        scenarios["surfaces"] = surfaces(rig, plan, work)
        _say("4. meterd")
        if lag is None:
            scenarios["meterd"] = {"throughput": None, "lag": None, "note": NOT_IN_STACK}
        else:
            scenarios["meterd"] = {
                "throughput": meterd_throughput(rig, plan, script=script),
                "lag": lag.report(),
            }
        _say("6. valid traffic under attack")
        scenarios["attack"] = under_attack(rig, plan, work)
        rss = {name: round(rss_mib(handle), 1) for name, handle in rig.handles().items()}
        _say("stopping the parts")
    _say("5. what the metrics add to a decision (in-process)")
    scenarios["metrics"] = metrics_cost(iterations=plan.metrics_iterations)
    small = scenarios["small"]["targets"]
    results: dict[str, Any] = {
        "version": 1,
        "plan": plan.name,
        "started_at": started_at,
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "loadavg_start": loadavg_start,
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "settings": attrs.asdict(plan),
    }
    results.update(headline(scenarios))
    results["resources"] = {
        "rss_mib": rss,
        "cpu_s_per_1k_requests": {
            name: target["cpu_s_per_1k_requests"] for name, target in small.items()
        },
    }
    results["scenarios"] = scenarios
    results["duration_s"] = round(time.monotonic() - began, 1)
    results["targets_met"] = verdicts(results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, run, print the table, write the JSON; 0 unless something broke."""
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.run",
        description="Benchmark the gateway against Caddy alone and the stand-in directly.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="one short round of everything (under a minute)"
    )
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--rate",
        type=float,
        action="append",
        help="fixed request rate of scenario 1 in req/s (repeatable; the first is the headline)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON")
    args = parser.parse_args(argv)
    plan = _PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.rate:
        plan = attrs.evolve(plan, fixed_rates=tuple(args.rate))
    signal.signal(signal.SIGTERM, _interrupt)
    results = run(plan)
    write_json(results, args.out)
    print(render_table(results))
    print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The results: the JSON file and the table printed at the end of a run."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

__all__ = ["TARGETS", "headline", "render_table", "verdicts", "write_json"]

#: The issue's targets: (JSON path, comparison, bound).
TARGETS: Final = (
    ("added_latency_ms.p50", "<=", 1.0),
    ("added_latency_ms.p99", "<=", 5.0),
    ("added_ttfb_ms.p50", "<=", 1.0),
    ("throughput_ratio", ">=", 0.5),
    ("meterd_lines_per_s", ">=", 5000.0),
    ("meterd_lag_s_max", "<=", 1.0),
    ("metrics_us_per_decision", "<=", 20.0),
    # Issue 11: writing the upstream body costs at most 0.2 ms at p50 (paired, sequential)...
    ("normalisation_added_p50_ms.small_chat", "<=", 0.2),
    ("normalisation_added_p50_ms.long_chat", "<=", 0.2),
    # ...and /v1 costs no more than /api through the gateway (0.1 ms: the resolution of
    # a paired sequential comparison on the shared development machine).
    ("v1_minus_api_added_p50_ms", "<=", 0.1),
    ("attack_p99_ratio", "<=", 2.0),
)


def _lookup(data: Mapping[str, Any], path: str) -> Any:
    value: Any = data
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _worst_metrics_cost(metrics: Mapping[str, Any] | None) -> float | None:
    if not metrics:
        return None
    return float(max(metrics["one_worker_us"], metrics["multiprocess_us"]))


def headline(scenarios: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level figures the issue asks for, pulled out of the scenario results."""
    small = scenarios.get("small") or {}
    streams = scenarios.get("streams") or {}
    meterd = scenarios.get("meterd") or {}
    normalised = (scenarios.get("normalisation") or {}).get("added_ms") or {}
    surfaces = (scenarios.get("surfaces") or {}).get("v1_minus_api_added_ms") or {}
    return {
        "added_latency_ms": small.get("added_latency_ms"),
        "throughput_ratio": small.get("throughput_ratio"),
        "added_ttfb_ms": streams.get("added_ttfb_ms"),
        "cadence_preserved": streams.get("cadence_preserved"),
        "meterd_lines_per_s": (meterd.get("throughput") or {}).get("lines_per_s"),
        "meterd_lag_s_max": ((meterd.get("lag") or {}).get("lag_s") or {}).get("max"),
        "metrics_us_per_decision": _worst_metrics_cost(scenarios.get("metrics")),
        "normalisation_added_p50_ms": {
            label: added.get("p50_paired") for label, added in normalised.items()
        }
        or None,
        "v1_minus_api_added_p50_ms": (surfaces.get("c_gateway") or {}).get("p50_paired"),
        "attack_p99_ratio": (scenarios.get("attack") or {}).get("p99_ratio"),
    }


def verdicts(results: Mapping[str, Any]) -> dict[str, bool | None]:
    """Each target met (True), missed (False) or not measured (None)."""
    found: dict[str, bool | None] = {}
    for path, op, bound in TARGETS:
        value = _lookup(results, path)
        if value is None:
            found[path] = None
        else:
            found[path] = value <= bound if op == "<=" else value >= bound
    return found


def write_json(results: Mapping[str, Any], path: Path) -> None:
    """Write the results atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        text = f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    else:
        text = str(value)
    return f"{text}{unit}"


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [_row(header, widths), _row(["-" * w for w in widths], widths)] + [
        _row(r, widths) for r in rows
    ]


def _side_by_side(scenarios: Mapping[str, Any]) -> list[str]:
    """Scenarios 6 and 7: sequential p50 per body or path and target, CPU per request."""
    lines: list[str] = []
    titles = (
        ("normalisation", "6. normalisation: the gateway with and without the upstream body"),
        ("surfaces", "7. surfaces: /api/chat and /v1/chat/completions through each hop"),
    )
    for name, title in titles:
        scenario = scenarios.get(name)
        if not scenario:
            continue
        lines.append(
            f"{title} (sequential, keep-alive, {scenario['blocks']} alternating blocks of "
            f"{scenario['block_size']}), ms; cpu = µs per request by part"
        )
        rows = []
        for label, targets in scenario["targets"].items():
            for index, (target, result) in enumerate(targets.items()):
                cpu = result["cpu_us_per_request"]
                rows.append(
                    [
                        label if index == 0 else "",
                        target,
                        _fmt(result["latency_ms"]["p50"]),
                        _fmt(result["latency_ms"]["p99"]),
                        " ".join(f"{part} {us}" for part, us in cpu.items()),
                        str(result["failures"]),
                    ]
                )
        lines += _table(["request", "target", "p50", "p99", "cpu", "failed"], rows)
        if name == "normalisation":
            for label, added in scenario["added_ms"].items():
                lines.append(
                    f"added by normalisation, {label}: p50 {_fmt(added['p50_paired'])} "
                    f"(paired), {_fmt(added['p50_pooled'])} (pooled)"
                )
        else:
            for target, extra in scenario["v1_minus_api_added_ms"].items():
                lines.append(
                    f"/v1 minus /api, added over the stand-in by {target}: p50 "
                    f"{_fmt(extra['p50_paired'])} (paired), {_fmt(extra['p50_pooled'])} (pooled)"
                )
        lines.append("")
    return lines


def render_table(results: Mapping[str, Any]) -> str:
    """A plain-text summary: one table per scenario, then the targets."""
    lines = [
        f"neuronetz-gateway bench ({results['plan']}): {results['cores']} cores, "
        f"load average at start {results['loadavg_start']}, {results['duration_s']:.0f} s",
        "",
    ]
    scenarios = results["scenarios"]
    small = scenarios.get("small")
    if small:
        lines.append(
            f"1. small requests: saturation (wrk, {small['wrk_connections']} connections) "
            "and latency at fixed rates (open loop), ms; cpu = CPU s per 1k requests at "
            f"{small['fixed_rate_rps']:g} req/s"
        )
        rows = []
        for name, target in small["targets"].items():
            for rate, lat in target["latency_by_rate_ms"].items():
                first = rate == next(iter(target["latency_by_rate_ms"]))
                rows.append(
                    [
                        name if first else "",
                        _fmt(target["saturation_rps"]) if first else "",
                        rate,
                        _fmt(lat["p50"]),
                        _fmt(lat["p90"]),
                        _fmt(lat["p99"]),
                        _fmt(target["cpu_s_per_1k_requests"].get("total")) if first else "",
                        str(target["failures"]) if first else "",
                    ]
                )
        lines += _table(
            ["target", "max req/s", "at req/s", "p50", "p90", "p99", "cpu", "failed"], rows
        )
        floors = small.get("auth_hop_floor_ms_by_rate") or {}
        for rate, added in small["added_latency_by_rate_ms"].items():
            lines.append(
                f"added by the gateway (c - b) at {rate} req/s: p50 {_fmt(added['p50'])}, "
                f"p99 {_fmt(added['p99'])}"
            )
            floor = floors.get(rate)
            if floor:
                lines.append(
                    f"  of which the auth hop to a do-nothing responder (b2 - b): "
                    f"p50 {_fmt(floor['p50'])}, p99 {_fmt(floor['p99'])}"
                )
        lines.append("")
    streams = scenarios.get("streams")
    if streams:
        lines.append(
            f"2. streams: {streams['streams_per_round']} per round at "
            f"{streams['stream_rate_per_s']:g}/s, {streams['tokens_per_s']:g} tokens/s "
            f"(nominal gap {streams['nominal_gap_ms']:g} ms), ms"
        )
        rows = []
        for name, target in streams["targets"].items():
            rows.append(
                [
                    name,
                    _fmt(target["ttfb_ms"]["p50"]),
                    _fmt(target["ttfb_ms"]["p99"]),
                    _fmt(target["gap_ms"]["p50"]),
                    _fmt(target["gap_ms"]["p99"]),
                    _fmt(target["peak_in_flight"]),
                    str(target["failures"]),
                ]
            )
        lines += _table(
            ["target", "ttfb p50", "ttfb p99", "gap p50", "gap p99", "in flight", "failed"], rows
        )
        lines.append("")
    alone = scenarios.get("policyd")
    if alone:
        hit, miss = alone["hit"], alone["miss"]
        lines.append(
            "3. policyd alone over its unix socket; cpu = policyd + Redis CPU ms per decision"
        )
        hit_rows = []
        cases = (
            ("hit", hit),
            ("hit, every limit set", alone.get("hit_limited")),
            ("hit, 64 KiB chat", alone.get("hit_long_chat")),
        )
        for label, case in cases:
            if not case:
                continue
            cpu = case["cpu_ms_per_decision"]
            hit_rows += [
                [
                    f"{label}, sequential",
                    _fmt(case["sequential_decisions_per_s"]),
                    _fmt(case["sequential_latency_ms"]["p50"]),
                    _fmt(case["sequential_latency_ms"]["p99"]),
                    "",
                    _fmt(case.get("argon2_runs")) if case is hit else "",
                ],
                [
                    f"{label}, {alone['concurrency']} at once",
                    _fmt(case["concurrent_decisions_per_s"]),
                    _fmt(case["concurrent_latency_ms"]["p50"]),
                    _fmt(case["concurrent_latency_ms"]["p99"]),
                    f"{_fmt(cpu['policyd'])} + {_fmt(cpu['redis'])}",
                    "",
                ],
            ]
        lines += _table(
            ["case", "decisions/s", "p50 ms", "p99 ms", "cpu", "argon2 runs"],
            [
                *hit_rows,
                [
                    f"miss ({miss['keys']} new keys)",
                    _fmt(miss["decisions_per_s"]),
                    _fmt(miss["latency_ms"]["p50"]),
                    _fmt(miss["latency_ms"]["p99"]),
                    "",
                    _fmt(miss["argon2_runs"]),
                ],
                [
                    "same keys again",
                    "",
                    _fmt(alone["miss_then_hit"]["latency_ms"]["p50"]),
                    _fmt(alone["miss_then_hit"]["latency_ms"]["p99"]),
                    "",
                    _fmt(alone["miss_then_hit"]["argon2_runs"]),
                ],
            ],
        )
        lines.append("")
    meterd = scenarios.get("meterd")
    if meterd:
        throughput = meterd.get("throughput") or {}
        lag = (meterd.get("lag") or {}).get("lag_s") or {}
        note = meterd.get("note")
        lines.append(
            "4. meterd: "
            + (
                note
                if note
                else f"{_fmt(throughput.get('lines_per_s'))} lines/s settled "
                f"({throughput.get('lines_settled')} lines); lag under scenario 1: "
                f"p50 {_fmt(lag.get('p50'), ' s')}, max {_fmt(lag.get('max'), ' s')}"
            )
        )
        lines.append("")
    metrics = scenarios.get("metrics")
    if metrics:
        lines.append(
            "metrics: what the Prometheus calls add to one decision, µs: "
            f"one worker {_fmt(metrics['one_worker_us'])}, "
            f"several workers (multiprocess files) {_fmt(metrics['multiprocess_us'])}"
        )
        lines.append("")
    lines += _side_by_side(scenarios)
    attack = scenarios.get("attack")
    if attack:
        lines += _attack_lines(attack)
    resources = results.get("resources") or {}
    if resources:
        lines.append(
            "9. resident memory after the run, MiB: "
            + ", ".join(f"{name} {_fmt(mib)}" for name, mib in resources["rss_mib"].items())
        )
        lines.append("")
    lines.append("targets:")
    for path, op, bound in TARGETS:
        verdict = results["targets_met"][path]
        mark = {True: "met", False: "MISSED", None: "not measured"}[verdict]
        lines.append(f"  {path} {op} {bound:g}: {_fmt(_lookup(results, path))} ({mark})")
    return "\n".join(lines)


def _attack_lines(attack: Mapping[str, Any]) -> list[str]:
    strength = attack["attack"]
    lines = [
        f"8. valid traffic ({attack['valid_rate']:g} req/s, open loop) beside "
        f"{strength['junk_clients']} junk-body clients ({strength['junk_body_bytes']:,} B), "
        f"{strength['wrong_secrets_per_s']:g} wrong secrets/s and "
        f"{strength['slow_clients']} slow uploads, ms"
    ]
    rows = []
    for name in ("baseline", "under_attack"):
        phase = attack[name]
        lat, first = phase["latency_ms"], phase["first_use_ms"]
        rows.append(
            [
                name,
                _fmt(lat["p50"]),
                _fmt(lat["p99"]),
                _fmt(first["p50"]),
                _fmt(first["max"]),
                str(phase["failures"]),
            ]
        )
    lines += _table(["phase", "p50", "p99", "first use p50", "first use max", "failed"], rows)
    lines.append(
        f"p99 under attack / baseline: {_fmt(attack['p99_ratio'])}; Argon2id runs during an "
        f"attack round: {_fmt(attack['argon2_runs_during_attack'])} (with the fresh keys' "
        "first uses); attackers got "
        + "; ".join(
            f"{name} {dict(sorted(counts.items()))}"
            for name, counts in attack["attack_outcomes"].items()
        )
    )
    lines.append("")
    return lines

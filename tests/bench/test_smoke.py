"""The benchmark harness runs end to end with tiny counts (no timing is asserted)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from compose.local.services import REPO_ROOT

__all__: list[str] = []


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The JSON of one `--smoke` run of `python -m tests.bench.run`."""
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    # On a timeout, Ctrl-C lets the runner stop every part of its rig by PID (each part
    # runs in its own session, so killing the runner alone would orphan them).
    runner = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.run", "--smoke", "--out", str(out)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        # Generous: the whole suite shares two cores; nothing here is a timing check.
        stdout, stderr = runner.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        runner.send_signal(signal.SIGINT)
        stdout, stderr = runner.communicate(timeout=60)
    done = subprocess.CompletedProcess(runner.args, runner.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "targets:" in done.stdout
    results: dict[str, Any] = json.loads(out.read_text())
    return results


def test_reports_the_figures_the_issue_names(smoke: dict[str, Any]) -> None:
    """The JSON carries the headline figures, the machine's cores and every scenario."""
    assert smoke["cores"] == os.cpu_count()
    for name in ("added_latency_ms", "added_ttfb_ms"):
        assert set(smoke[name]) >= {"p50", "p99"}
    assert smoke["throughput_ratio"] is not None
    assert "meterd_lines_per_s" in smoke
    assert set(smoke["scenarios"]) == {
        "small",
        "streams",
        "policyd",
        "meterd",
        "metrics",
        "normalisation",
        "surfaces",
        "attack",
    }
    assert smoke["metrics_us_per_decision"] is not None
    assert set(smoke["normalisation_added_p50_ms"]) >= {"small_chat", "long_chat"}
    assert "v1_minus_api_added_p50_ms" in smoke
    assert set(smoke["resources"]["rss_mib"]) >= {"policyd", "caddy"}


def test_every_request_succeeded(smoke: dict[str, Any]) -> None:
    """No target refused or dropped a request, so the latencies describe real answers."""
    for target in smoke["scenarios"]["small"]["targets"].values():
        assert target["failures"] == 0
        assert target["latency_ms"]["p50"] is not None
    for target in smoke["scenarios"]["streams"]["targets"].values():
        assert target["failures"] == 0
        assert target["tokens_per_stream"] > 1
    assert smoke["scenarios"]["policyd"]["hit"]["failures"] == 0
    assert smoke["scenarios"]["policyd"]["hit_limited"]["failures"] == 0
    assert smoke["scenarios"]["policyd"]["hit_long_chat"]["failures"] == 0
    for name in ("normalisation", "surfaces"):
        for targets in smoke["scenarios"][name]["targets"].values():
            for result in targets.values():
                assert result["failures"] == 0
                assert result["latency_ms"]["p50"] is not None


def test_argon2_runs_only_for_keys_policyd_has_not_seen(smoke: dict[str, Any]) -> None:
    """Cache hits run no Argon2id; each new key runs it exactly once, then never again."""
    alone = smoke["scenarios"]["policyd"]
    assert alone["hit"]["argon2_runs"] == 0
    assert alone["miss"]["argon2_runs"] == alone["miss"]["keys"]
    assert alone["miss_then_hit"]["argon2_runs"] == 0


def test_valid_traffic_is_served_beside_the_attack(smoke: dict[str, Any]) -> None:
    """Scenario 5 runs both phases; every valid request succeeds, attackers are refused."""
    attack = smoke["scenarios"]["attack"]
    for phase in ("baseline", "under_attack"):
        assert attack[phase]["failures"] == 0
        assert attack[phase]["latency_ms"]["p99"] is not None
    outcomes = attack["attack_outcomes"]
    assert "200" not in outcomes["junk"]
    assert set(outcomes["wrong_secret"]) <= {"401", "429"}


def test_meterd_settles_the_backlog(smoke: dict[str, Any]) -> None:
    """With meterd in the stack, it settles a backlog written while it was stopped."""
    meterd = smoke["scenarios"]["meterd"]
    if meterd.get("note"):
        pytest.fail(meterd["note"])
    assert meterd["throughput"]["backlog_lines"] > 0
    assert meterd["throughput"]["reached_end"] is True

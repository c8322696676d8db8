"""meterd's metrics: bounded tenant labels, settings, and a listener that fails loudly."""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Final

import pytest
from prometheus_client import REGISTRY

from compose.local.processes import base_env
from compose.local.services import REPO_ROOT
from meterd import metrics
from meterd.settings import SettingsError, load_settings

_VALID: Final = {
    "NZ_DATABASE_URL": "postgresql+asyncpg://nz@127.0.0.1/nz",
    "NZ_REDIS_URL": "unix:///run/redis.sock",
    "NZ_ACCESS_LOG": "/var/log/caddy/access.log",
}


def test_tenant_labels_stay_bounded_whatever_the_tenants() -> None:
    """Ten thousand tenants with a limit of 3: the first three are named, the rest `other`."""
    labels = metrics.TenantLabels(3)
    tenants = [str(uuid.uuid4()) for _ in range(10_000)]
    seen = {labels.label(tenant) for tenant in tenants}
    assert seen == {*tenants[:3], metrics.OTHER_TENANTS}
    assert labels.label(tenants[0]) == tenants[0]  # a named tenant stays named
    assert labels.label(tenants[5]) == metrics.OTHER_TENANTS


def test_zero_names_no_tenant() -> None:
    """NZ_METERD_METRICS_TENANTS=0: every tenant is `other`."""
    labels = metrics.TenantLabels(0)
    assert labels.label(str(uuid.uuid4())) == metrics.OTHER_TENANTS


def test_metrics_settings_defaults_are_internal() -> None:
    """By default the listener is on loopback, port 9181, 50 named tenants."""
    settings = load_settings(_VALID)
    assert settings.metrics_bind == "127.0.0.1"
    assert settings.metrics_port == 9181
    assert settings.metrics_tenants == 50
    assert load_settings({**_VALID, "NZ_METERD_METRICS_PORT": "0"}).metrics_port == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("NZ_METERD_METRICS_PORT", "65536"),
        ("NZ_METERD_METRICS_PORT", "-1"),
        ("NZ_METERD_METRICS_PORT", "80.5"),
        ("NZ_METERD_METRICS_PORT", "lots"),
        ("NZ_METERD_METRICS_TENANTS", "1001"),
        ("NZ_METERD_METRICS_TENANTS", "-5"),
        ("NZ_METERD_METRICS_TENANTS", "1e9"),
    ],
)
def test_bad_metrics_settings_are_refused(name: str, value: str) -> None:
    """Out-of-range ports and tenant caps are configuration errors, named."""
    with pytest.raises(SettingsError, match=name):
        load_settings({**_VALID, name: value})


def test_a_taken_port_stops_meterd_with_a_clear_line(tmp_path: Path) -> None:
    """The metrics port is in use: meterd exits 2 at start and says which address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = base_env(
            {
                **_VALID,
                "NZ_ACCESS_LOG": str(tmp_path / "access.log"),
                "NZ_METERD_METRICS_PORT": str(port),
            }
        )
        done = subprocess.run(
            [sys.executable, "-m", "meterd"],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 2, done.stderr
    assert f"127.0.0.1:{port}" in done.stderr
    assert "NZ_METERD_METRICS_PORT" in done.stderr


def test_a_miscount_never_raises() -> None:
    """Counters refuse negative steps; meterd's counting clamps, so settlement carries on."""

    def skipped() -> float | None:
        return REGISTRY.get_sample_value("nz_meterd_lines_total", {"result": "skipped"})

    metrics.count_lines(lines=0, bad=0, records=0, inserted=0)
    before = skipped()
    metrics.count_lines(lines=1, bad=2, records=3, inserted=5)
    metrics.swept(-1)
    assert skipped() == before

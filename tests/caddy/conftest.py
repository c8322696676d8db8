"""Fixtures that run the dev Caddyfile against fake policyd and Ollama servers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.caddy.fakes import FakeAuth, FakeUpstream
from tests.caddy.gateway import MAX_BODY_BYTES, Gateway
from tests.caddy.runner import DEV_CADDYFILE, free_port, run_caddy

__all__ = ["gateway", "running_gateway"]


@pytest.fixture(scope="module")
def running_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One Caddy (dev Caddyfile) per module, with its fakes, all stopped afterwards."""
    workdir = tmp_path_factory.mktemp("caddy")
    socket_path = workdir / "policyd.sock"
    auth = FakeAuth(socket_path=socket_path)
    upstream = FakeUpstream()
    port = free_port()
    env = {
        "NZ_HTTP_PORT": str(port),
        "NZ_ACCESS_LOG": str(workdir / "access.log"),
        "NZ_POLICYD_SOCKET": str(socket_path),
        "NZ_OLLAMA_URL": f"http://127.0.0.1:{upstream.port}",
        "NZ_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
    }
    try:
        with run_caddy(
            caddyfile=DEV_CADDYFILE, env=env, port=port, stderr_path=workdir / "caddy.err"
        ):
            yield Gateway(
                port=port,
                auth=auth,
                upstream=upstream,
                access_log=workdir / "access.log",
                stderr_log=workdir / "caddy.err",
            )
    finally:
        auth.close()
        upstream.close()


@pytest.fixture
def gateway(running_gateway: Gateway) -> Gateway:
    """The module's gateway with the fakes' records cleared."""
    running_gateway.auth.recorder.clear()
    running_gateway.upstream.recorder.clear()
    return running_gateway

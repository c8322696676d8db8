"""The composed stack: ready through Caddy, parts restartable, env complete for the CLI."""

from __future__ import annotations

import pytest

from compose.local.cli_runner import run_cli_json
from compose.local.parts import Stack

__all__: list[str] = []

pytestmark = pytest.mark.e2e


def test_stack_is_ready_through_caddy(stack: Stack) -> None:
    """GET /readyz through Caddy answers 200 once the stack fixture is up."""
    status, body = stack.ready()
    assert status == 200, body
    assert stack.gateway_url.startswith("http://127.0.0.1:")
    assert stack.policyd_socket.is_socket()


def test_stopped_redis_shows_in_readyz_and_restarts(stack: Stack) -> None:
    """With Redis stopped /readyz is not 200; after a restart on the same port it is again."""
    port = stack.redis.launcher.port
    stack.redis.stop()
    status, body = stack.ready()
    assert status == 503, body
    assert "redis" in body.lower()
    stack.redis.start()
    assert stack.redis.launcher.port == port
    stack.wait_ready(timeout=15.0)


def test_stopped_policyd_fails_closed_and_restarts(stack: Stack) -> None:
    """With policyd stopped the gateway answers no 200; a restart brings it back."""
    stack.policyd.stop()
    assert not stack.policyd_socket.exists() or stack.ready()[0] != 200
    stack.policyd.start()
    stack.wait_ready(timeout=15.0)


def test_env_runs_the_cli_against_the_stack(stack: Stack) -> None:
    """Stack.env is a complete environment for the admin CLI as a subprocess."""
    tenant = run_cli_json("create-tenant", "--name", "harness", env=stack.env)
    assert tenant["name"] == "harness"
    key = run_cli_json("create-key", "--tenant", "harness", "--name", "k1", env=stack.env)
    assert key["key"].startswith("nz_")
    assert key["tenant"] == "harness"

"""Experiment: how Caddy's wildcard header deletion interacts with forward_auth's copy_headers.

This is why caddy/gateway.caddy deletes client `X-Nz-*` with `request_header` *before*
forward_auth instead of with `header_up -X-Nz-*` in the Ollama reverse_proxy.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from policyd.shared import contract
from tests.caddy.fakes import GOOD_KEY, FakeAuth, FakeUpstream, SeenRequest, grant
from tests.caddy.runner import free_port, run_caddy

EXPERIMENT = """\
{{
	admin off
	auto_https off
}}
http://127.0.0.1:{port} {{
	bind 127.0.0.1
	route {{
		{before_auth}
		forward_auth unix/{socket} {{
			uri /authz
			copy_headers X-Nz-Grant
		}}
		reverse_proxy 127.0.0.1:{upstream} {{
			{header_up}
		}}
	}}
}}
"""


def _one_request(
    tmp_path: Path, *, before_auth: str, header_up: str
) -> tuple[SeenRequest, SeenRequest]:
    """What policyd and the upstream saw for one authorised request with spoofed X-Nz-*."""
    socket_path = tmp_path / "auth.sock"
    auth = FakeAuth(socket_path=socket_path)
    upstream = FakeUpstream()
    port = free_port()
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(
        EXPERIMENT.format(
            port=port,
            socket=socket_path,
            upstream=upstream.port,
            before_auth=before_auth,
            header_up=header_up,
        )
    )
    try:
        with run_caddy(caddyfile=caddyfile, env={}, port=port, stderr_path=tmp_path / "err"):
            response = httpx.get(
                f"http://127.0.0.1:{port}/api/tags",
                headers={
                    "Authorization": f"Bearer {GOOD_KEY}",
                    "X-Nz-Unknown": "spoofed",
                    "x-nz-grant": "spoofed",
                    "X-Other": "kept",
                },
            )
            assert response.status_code == 200
    finally:
        auth.close()
        upstream.close()
    (auth_seen,) = auth.recorder.all()
    (upstream_seen,) = upstream.recorder.all()
    assert upstream_seen.header("X-Other") == "kept"
    return auth_seen, upstream_seen


@pytest.mark.parametrize("pattern", ["-X-Nz-*", "-x-nz-*"])
def test_header_up_wildcard_also_deletes_copied_headers(tmp_path: Path, pattern: str) -> None:
    """`header_up -X-Nz-*` works (any case) but also strips what copy_headers set from policyd."""
    auth, upstream = _one_request(tmp_path, before_auth="", header_up=f"header_up {pattern}")
    assert auth.header("X-Nz-Unknown") == "spoofed"
    assert auth.header(contract.H_GRANT) == "spoofed"
    assert not {name for name in upstream.names() if name.startswith("x-nz-")}


def test_request_header_wildcard_before_auth_keeps_copied_headers(tmp_path: Path) -> None:
    """`request_header -X-Nz-*` before forward_auth hides client X-Nz-* from both, keeps copies."""
    auth, upstream = _one_request(
        tmp_path, before_auth="request_header -X-Nz-*", header_up="flush_interval -1"
    )
    assert not {name for name in auth.names() if name.startswith("x-nz-")}
    assert {name for name in upstream.names() if name.startswith("x-nz-")} == {"x-nz-grant"}
    assert upstream.header(contract.H_GRANT) == grant(capture=False).encode()

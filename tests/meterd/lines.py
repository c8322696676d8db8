"""Access-log lines shaped exactly like Caddy's, for meterd's tests.

`caddy_line()` starts from a line the real Caddy 2.11.7 wrote (trimmed of headers that
do not matter) and adds the fields the gateway's Caddyfile appends.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Final

from policyd.shared.contract import LOG_GRANT, LOG_REFUSED, Grant, parse_grant

__all__ = [
    "KEY_ID",
    "KEY_PREFIX",
    "REAL_LINE",
    "TENANT_ID",
    "caddy_line",
    "encode",
    "with_grant_values",
]

KEY_ID: Final = "0b8f6a52-3f5e-4c8e-9d1a-7f2d2b1c9e01"
TENANT_ID: Final = "5a1d3c44-8e2b-4f7a-b0c9-1e2d3f4a5b6c"
KEY_PREFIX: Final = "nz_ab12cd34"

#: Written by Caddy 2.11.7 (reverse_proxy to a small NDJSON upstream), uuid and ttfb kept.
REAL_LINE: Final = (
    b'{"level":"info","ts":1795697863.4316487,"logger":"http.log.access.log0",'
    b'"msg":"handled request","request":{"remote_ip":"127.0.0.1","remote_port":"47360",'
    b'"client_ip":"127.0.0.1","proto":"HTTP/1.1","method":"POST","host":"127.0.0.1:18777",'
    b'"uri":"/api/chat","headers":{"User-Agent":["curl/7.88.1"],"Accept":["*/*"],'
    b'"Content-Length":["3"],"Content-Type":["application/x-www-form-urlencoded"]}},'
    b'"bytes_read":3,"user_id":"","duration":0.203334149,"size":24,"status":200,'
    b'"resp_headers":{"X-Request-Id":["c5d69ea4-7607-4977-ad8b-c39a487e26f9"],'
    b'"Via":["1.1 Caddy"],"Server":["BaseHTTP/0.6 Python/3.11.7"],'
    b'"Date":["Thu, 26 Nov 2026 12:57:43 GMT"],"Content-Type":["application/x-ndjson"]},'
    b'"uuid":"c5d69ea4-7607-4977-ad8b-c39a487e26f9","ttfb_ms":51.323257999999996}'
)


def caddy_line(
    *,
    request_id: str | None = None,
    path: str = "/api/chat",
    method: str = "POST",
    status: int = 200,
    size: int = 100,
    bytes_read: int = 50,
    duration: float = 0.25,
    ts: float | None = None,
    admitted: bool = True,
    model: str = "llama3.2",
    stream: bool = True,
    resp_body: str | None = None,
    req_body: str | None = None,
    prompt_log: bool = False,
    reserved: int | None = 1000,
    counted: int | None = None,
    refusal: str | None = None,
    refused: str | None = None,
    key_id: str = KEY_ID,
    tenant_id: str = TENANT_ID,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A line as the gateway's Caddyfile makes Caddy write it (as a dict)."""
    line: dict[str, Any] = {
        "level": "info",
        "ts": ts if ts is not None else time.time(),
        "logger": "http.log.access.log0",
        "msg": "handled request",
        "request": {
            "remote_ip": "127.0.0.1",
            "remote_port": "40000",
            "client_ip": "127.0.0.1",
            "proto": "HTTP/1.1",
            "method": method,
            "host": "gateway.test",
            "uri": path,
            "headers": {"User-Agent": ["test-client/1.0"], "Authorization": ["REDACTED"]},
        },
        "bytes_read": bytes_read,
        "user_id": "",
        "duration": duration,
        "size": size,
        "status": status,
        "resp_headers": {"Via": ["1.1 Caddy"]},
        "uuid": request_id or str(uuid.uuid4()),
    }
    if refusal is not None:
        line["resp_headers"]["X-Nz-Refusal"] = [refusal]
    if req_body is not None:
        line["req_body"] = req_body  # early log_append: before the late fields
    # Caddy logs a refusal without the log_append fields that follow forward_auth.
    if admitted:
        surface = "openai" if path.startswith("/v1/") else "ollama"
        line[LOG_GRANT] = Grant(
            key_id=key_id,
            key_prefix=KEY_PREFIX,
            tenant_id=tenant_id,
            surface=surface,
            stream=stream,
            capture=resp_body is not None,
            prompt_log=prompt_log,
            reserved=reserved,
            prompt=counted,
            model=model,
        ).encode()
    elif refused is not None:
        line[LOG_REFUSED] = refused
    line["ttfb_ms"] = 12.5
    if resp_body is not None:
        line["resp_body"] = resp_body
    line.update(extra or {})
    return line


def encode(line: dict[str, Any]) -> bytes:
    """One log line as Caddy writes it (compact JSON, no newline).

    Text that UTF-8 cannot hold (lone surrogates) is written as `\\uXXXX` escapes.
    """
    text = json.dumps(line, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(line, separators=(",", ":")).encode()


def with_grant_values(line: dict[str, Any], **values: str) -> str:
    """`line`'s grant with some values replaced as written (hostile ones included)."""
    fields = {**parse_grant(line[LOG_GRANT]), **values}
    return " ".join(f"{name}={value}" for name, value in fields.items())

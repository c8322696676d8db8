"""The lease follower's reading of a line: request id and tenant of admitted requests."""

from __future__ import annotations

import uuid

from meterd.leases import release_calls
from meterd.tail import Checkpoint, FileId, Line
from policyd.shared.keyspace import release_call
from tests.meterd.lines import KEY_ID, TENANT_ID, caddy_line, encode

_AT = Checkpoint(file=FileId(dev=1, inode=1), offset=0, fingerprint=b"", fingerprint_len=0)


def _line(data: bytes, *, truncated: bool = False) -> Line:
    return Line(data=data, start=0, checkpoint=_AT, truncated=truncated)


def test_admitted_lines_release_and_everything_else_is_left_to_settlement() -> None:
    """Lines with a grant name their lease sets, cut ones too; refusals, garbage and
    hostile ids release nothing (settlement counts bad lines, not the lease follower)."""
    ids = [str(uuid.uuid4()) for _ in range(4)]
    lines = [
        _line(encode(caddy_line(request_id=ids[0]))),
        _line(encode(caddy_line(request_id=ids[1], model="other"))),
        _line(encode(caddy_line(request_id=ids[2], admitted=False, status=429))),
        _line(b"not json"),
        _line(encode({**caddy_line(request_id=ids[3]), "uuid": "../../etc"})),
        _line(encode(caddy_line(request_id=ids[3], resp_body="x" * 100))[:-40], truncated=True),
    ]
    expected = [
        release_call(tenant_id=TENANT_ID, key_id=KEY_ID, request_id=i)
        for i in (ids[0], ids[1], ids[3])
    ]
    assert [(list(k), list(a)) for k, a in release_calls(lines)] == expected

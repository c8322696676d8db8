"""Settlement records and batches built from Caddy-shaped lines, for meterd's tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]

from meterd.parse import Event, parse_line
from meterd.records import Batch, Record
from meterd.settle import Store
from meterd.settle_script import SettleScript
from meterd.tail import Checkpoint, FileId
from meterd.usage import Calibration, measure
from policyd.authz.records import KeyRecord
from tests.meterd.lines import caddy_line, encode

__all__ = ["LOG", "batch", "exact", "position", "record", "store"]

LOG = Path("/var/log/caddy/access.log")


def position(offset: int) -> Checkpoint:
    return Checkpoint(
        file=FileId(dev=2**63 + 5, inode=2**64 - 3),  # unsigned values beyond int64
        offset=offset,
        fingerprint=hashlib.sha256(b"head").digest(),
        fingerprint_len=4,
    )


def store(pool: asyncpg.Pool, script: SettleScript, *, node: str = "node-a") -> Store:
    return Store(
        pool, script, node=node, log_path=LOG, prompt_retention_days=30, max_prompt_bytes=64
    )


def record(key: KeyRecord, **fields: object) -> Record:
    line = caddy_line(key_id=key.key_id, tenant_id=key.tenant_id, **fields)  # type: ignore[arg-type]
    event = parse_line(encode(line))
    assert isinstance(event, Event)
    measured = measure(event, Calibration())
    return Record(event=event, usage=measured.usage, observation=measured.observation)


def exact(key: KeyRecord, prompt: int, completion: int, **fields: object) -> Record:
    body = (
        f'{{"message":{{"content":"{"w" * completion}"}},"done":true,'
        f'"prompt_eval_count":{prompt},"eval_count":{completion}}}'
    )
    return record(key, stream=False, resp_body=body, **fields)


def batch(records: list[Record], offset: int = 100) -> Batch:
    return Batch(
        records=tuple(records), checkpoint=position(offset), lines=len(records), bad_lines=0
    )

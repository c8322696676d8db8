"""The attackers of scenario 6, run in their own process: `python -m tests.bench.attackers`.

Its own process, at a lower priority, so that the attacker's own work (on a real
attack, another machine's) does not slow the event loop that times the valid traffic.
Arguments come as one JSON object in argv; the attack runs until a line arrives on
stdin, then the outcomes are printed as JSON on stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import string
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

from tests.bench.http1 import build_request, read_reply
from tests.bench.rig import Target

__all__ = ["JUNK_BYTES", "main"]

_SECRET_ALPHABET: Final = string.digits + string.ascii_uppercase + string.ascii_lowercase
#: ~8 MiB (the gateway's default body limit) of empty JSON objects.
_JUNK: Final = b"[" + b"{}," * 2_796_000 + b"{}]"
JUNK_BYTES: Final = len(_JUNK)
#: What the slow clients announce (under the 8 MiB limit, so Caddy waits for it).
_SLOW_LENGTH: Final = 8_000_000
#: How much lower than the bench's own processes the attackers run.
_NICENESS: Final = 10
#: One attacker: runs until its event is set.
Attacker = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


def _wrong_key(prefix: str) -> str:
    return f"{prefix}_" + "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(43))


def _unknown_prefix() -> str:
    return "nz_" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz234567") for _ in range(8))


class _Tally:
    """Attack requests by outcome (status code or error name)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1


async def _connect(target: Target) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(target.host, target.port)


async def _exchange(target: Target, request: bytes, tally: _Tally) -> None:
    """One request on a fresh connection; the outcome is tallied, never raised.

    The reply is read while the request is still being written, as an attacker would:
    a refusal that comes before the body is sent ends the attempt at once.
    """
    writer = None
    try:
        reader, writer = await _connect(target)
        writer.write(request)
        draining = asyncio.ensure_future(writer.drain())
        try:
            reply = await asyncio.wait_for(read_reply(reader), 60)
        finally:
            draining.cancel()
            await asyncio.gather(draining, return_exceptions=True)
        tally.add(str(reply.status))
    except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
        tally.add(type(exc).__name__)
    finally:
        if writer is not None:
            writer.transport.abort()


async def _junk_client(target: Target, stop: asyncio.Event, tally: _Tally) -> None:
    """Post ~8 MiB of `{}` over and over, reading the answer while still sending.

    Raw non-blocking sockets and a memoryview: the attacker's own CPU must not be what
    slows the (shared) machine down.
    """
    host = f"{target.host}:{target.port}"
    key = _wrong_key(_unknown_prefix())
    request = memoryview(
        build_request(
            "POST", "/api/chat", host=host, headers={"Authorization": f"Bearer {key}"}, body=_JUNK
        )
    )
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sending = None
        try:
            await loop.sock_connect(sock, (target.host, target.port))
            sending = asyncio.ensure_future(loop.sock_sendall(sock, request))
            head = await asyncio.wait_for(loop.sock_recv(sock, 4096), 60)
            tally.add(head.split(b" ", 2)[1].decode() if head.startswith(b"HTTP/") else "closed")
        except (OSError, TimeoutError, IndexError) as exc:
            tally.add(type(exc).__name__)
        finally:
            if sending is not None:
                sending.cancel()
                await asyncio.gather(sending, return_exceptions=True)
            sock.close()


async def _wrong_secrets(
    target: Target, prefix: str, rate: float, stop: asyncio.Event, tally: _Tally
) -> None:
    host = f"{target.host}:{target.port}"
    body = b'{"model":"llama3.2","messages":[]}'
    pending: set[asyncio.Task[None]] = set()
    started = time.monotonic()
    sent = 0
    while not stop.is_set():
        due = started + sent / rate
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, due - time.monotonic()))
        if stop.is_set():
            break
        headers = {"Authorization": f"Bearer {_wrong_key(prefix)}"}
        request = build_request("POST", "/api/chat", host=host, headers=headers, body=body)
        task = asyncio.create_task(_exchange(target, request, tally))
        pending.add(task)
        task.add_done_callback(pending.discard)
        sent += 1
    await asyncio.gather(*pending, return_exceptions=True)


async def _slow_client(target: Target, gap_s: float, stop: asyncio.Event, tally: _Tally) -> None:
    """Headers, then a byte every `gap_s` until the gateway hangs up; then again."""
    key = _wrong_key(_unknown_prefix())
    head = (
        f"POST /api/chat HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: {_SLOW_LENGTH}\r\n\r\n"
    ).encode()
    while not stop.is_set():
        writer = None
        outcome = "still_open_at_end"
        try:
            reader, writer = await _connect(target)
            writer.write(head)
            while not stop.is_set():
                writer.write(b" ")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    if not await asyncio.wait_for(reader.read(65536), gap_s):
                        outcome = "closed_by_gateway"
                        break
        except (OSError, asyncio.IncompleteReadError) as exc:
            outcome = type(exc).__name__
        finally:
            if writer is not None:
                writer.close()
        tally.add(outcome)


async def _attack(options: dict[str, Any]) -> dict[str, dict[str, int]]:
    target = Target(name="gateway", host=options["host"], port=options["port"])
    tallies = {"junk": _Tally(), "wrong_secret": _Tally(), "slow": _Tally()}
    attackers: list[Attacker] = [
        *(
            lambda stop: _junk_client(target, stop, tallies["junk"])
            for _ in range(options["junk_clients"])
        ),
        *(
            lambda stop: _wrong_secrets(
                target,
                options["victim_prefix"],
                options["wrong_per_s"],
                stop,
                tallies["wrong_secret"],
            )
            for _ in range(1 if options["wrong_per_s"] > 0 else 0)
        ),
        *(
            lambda stop: _slow_client(target, options["slow_gap_s"], stop, tallies["slow"])
            for _ in range(options["slow_clients"])
        ),
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    running = [asyncio.create_task(attack(stop)) for attack in attackers]
    print("started", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    stop.set()
    await asyncio.gather(*running, return_exceptions=True)
    return {name: tally.counts for name, tally in tallies.items()}


def main() -> int:
    """Attack until stdin says stop; print the outcomes."""
    # A real attacker uses its own machine; here it shares the gateway's cores, so it
    # yields them first (the gateway still answers everything it sends).
    os.nice(_NICENESS)
    outcomes = asyncio.run(_attack(json.loads(sys.argv[1])))
    print(json.dumps(outcomes), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

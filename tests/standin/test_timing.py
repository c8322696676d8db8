"""Pacing (first token delay, tokens per second), client disconnects, cross-server determinism."""

from __future__ import annotations

import itertools
import statistics
import time

import httpx

from tests.standin.conftest import Standin

REQUEST = {"model": "llama3.2", "prompt": "Describe the sea.", "options": {"num_predict": 20}}


def test_cadence_follows_the_configured_rate(paced_standin: Standin) -> None:
    """At 50 tokens/s after 200 ms, 20 tokens take about 0.2 + 19/50 s, evenly spaced."""
    arrivals: list[float] = []
    start = time.monotonic()
    with httpx.stream("POST", f"{paced_standin.url}/api/generate", json=REQUEST, timeout=10) as r:
        for _line in r.iter_lines():
            arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 21
    # Tokens are never early (fixed schedule), only late under load: loose upper bounds.
    assert 0.19 <= arrivals[0] <= 1.5
    assert 0.55 <= arrivals[19] <= 2.5
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals[:20])]
    assert statistics.median(gaps) <= 0.06


def test_non_streamed_reply_takes_as_long(paced_standin: Standin) -> None:
    """stream:false waits for every token before answering."""
    start = time.monotonic()
    response = httpx.post(
        f"{paced_standin.url}/api/generate", json={**REQUEST, "stream": False}, timeout=10
    )
    elapsed = time.monotonic() - start
    assert response.json()["eval_count"] == 20
    assert 0.55 <= elapsed <= 2.5


def test_disconnect_stops_generation(paced_standin: Standin) -> None:
    """A client that leaves mid-stream stops the generation; the log says so."""
    paced_standin.clear()
    body = {"model": "llama3.2", "prompt": "A long story, please."}
    with httpx.stream("POST", f"{paced_standin.url}/api/generate", json=body, timeout=10) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.monotonic() + 5
    while not (record := paced_standin.requests()[-1])["disconnected"]:
        assert time.monotonic() < deadline, record
        time.sleep(0.05)
    sent = record["tokens_sent"]
    time.sleep(0.2)
    assert paced_standin.requests()[-1]["tokens_sent"] == sent < 15


def test_servers_agree_on_replies(standin: Standin, paced_standin: Standin) -> None:
    """Two processes with different timing give the same reply to the same request."""
    body = {**REQUEST, "stream": False}
    fast = httpx.post(f"{standin.url}/api/generate", json=body, timeout=10).json()
    paced = httpx.post(f"{paced_standin.url}/api/generate", json=body, timeout=10).json()
    assert fast["response"] == paced["response"]
    assert fast["context"] == paced["context"]

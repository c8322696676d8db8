"""What the access log keeps for a key without prompt logging: usage figures, no content."""

from __future__ import annotations

import json
from typing import Any

import httpx

from compose.local.parts import Stack
from tests.e2e.conftest import make_key
from tests.e2e.test_metering import audit_rows

_CHAT = [{"role": "user", "content": "Describe the river Rhine in detail."}]


def _texts(reply: dict[str, Any]) -> list[str]:
    """The content a client received in a reply, in the pieces a log could hold."""
    found: list[str] = []
    if isinstance(reply.get("response"), str):
        found.append(reply["response"])
    message = reply.get("message")
    if isinstance(message, dict):
        found.append(message.get("content", ""))
    for choice in reply.get("choices", []):
        found.append(choice.get("text") or choice.get("message", {}).get("content", ""))
    for vector in reply.get("embeddings", []):
        found.extend(json.dumps(x) for x in vector[:5])
    if "embedding" in reply:
        found.extend(json.dumps(x) for x in reply["embedding"][:5])
    for item in reply.get("data", []):
        found.extend(json.dumps(x) for x in item["embedding"][:5])
    if isinstance(reply.get("context"), list):
        found.append(",".join(str(i) for i in reply["context"][:6]))
    return [t for t in found if len(t) >= 6]


def test_the_access_log_keeps_no_reply_content_and_no_query(stack: Stack, gateway: str) -> None:
    """After non-opted traffic on every surface, no reply text, vector, token id or query
    string is in the access log; the audit still has exact usage for every request."""
    key = make_key(stack, tenant="quiet-corp", name="plain")
    auth = {"Authorization": f"Bearer {key}"}
    calls = [
        ("/api/chat", {"model": "llama3.2", "messages": _CHAT, "stream": False}),
        ("/api/generate", {"model": "llama3.2", "prompt": "Describe the Danube.", "stream": False}),
        ("/v1/chat/completions", {"model": "llama3.2", "messages": _CHAT}),
        ("/v1/completions", {"model": "llama3.2", "prompt": "Describe the Loire."}),
        ("/api/embed", {"model": "all-minilm", "input": ["river", "delta"]}),
        ("/api/embeddings", {"model": "all-minilm", "prompt": "river"}),
        ("/v1/embeddings", {"model": "all-minilm", "input": "estuary"}),
    ]
    secrets: list[str] = []
    ids: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=gateway, timeout=60) as client:
        for path, body in calls:
            reply = client.post(f"{path}?key={key}&q=secret-query", json=body, headers=auth)
            assert reply.status_code == 200, (path, reply.text)
            answer = reply.json()
            texts = _texts(answer)
            assert texts, path
            secrets.extend(texts)
            ids[reply.headers["x-request-id"]] = answer
        # 2,300 embedding inputs: the vectors are megabytes, the log line stays small and
        # the usage exact (it was cut and charged the reservation).
        many = {"model": "all-minilm", "input": [f"item {i}" for i in range(2300)]}
        big = client.post("/api/embed", json=many, headers=auth)
        assert big.status_code == 200
        ids[big.headers["x-request-id"]] = big.json()
        secrets.extend(_texts(big.json())[:20])
    rows = audit_rows(stack, list(ids))
    for request_id, answer in ids.items():
        row = rows[request_id]
        usage = answer.get("usage") or {}
        expected = answer.get("prompt_eval_count", usage.get("prompt_tokens"))
        if expected is not None:
            assert row["usage_source"] == "exact", row
            assert row["prompt_tokens"] == expected, row
    log = stack.access_log.read_text(encoding="utf-8")
    assert key not in log
    assert "secret-query" not in log
    for text in secrets:
        # As the log's JSON would hold it, and as it is.
        assert json.dumps(text)[1:-1] not in log, text
        assert text not in log, text
    # Other tests share this log (opted-in prompts among them): only our lines are sized.
    ours = [line for line in log.splitlines() if any(i in line for i in ids)]
    assert len(ours) == len(ids)
    for line in ours:
        assert len(line) < 8192, line[:200]

"""A protocol-faithful Ollama stand-in for tests, benchmarks and the `make up` demo.

Serve it with Granian (`compose.standin.app:create_app`, a factory reading
NZ_STANDIN_TOKENS_PER_S, NZ_STANDIN_FIRST_TOKEN_MS and NZ_STANDIN_MODELS) or with
`python -m compose.standin --host 127.0.0.1 --port P`. Replies are deterministic
functions of (model, prompt); token counts follow `tokenizer` so tests can recompute
them; `/__standin/*` exposes what the server received.
"""

from __future__ import annotations

__all__: list[str] = []

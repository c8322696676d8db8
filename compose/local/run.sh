#!/usr/bin/env bash
# Entry point of `make up|down|status|migrate`. `up` first runs the one install step
# (compose/local/install.sh); every command then runs compose/local/up.py, which starts the
# parts with the same launchers the tests use.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

command="${1:?usage: compose/local/run.sh up|down|status|migrate}"
export PATH="$HOME/.local/bin:/usr/local/bin:$PATH"

if [[ $command == up ]]; then
	compose/local/install.sh
fi
command -v uv >/dev/null || { echo "uv is missing: run make up first" >&2; exit 1; }
exec uv run --frozen --quiet python -m compose.local.up "$command"

#!/usr/bin/env bash
# Entry point of `make up|down|status|migrate`. `up` first installs whatever is missing
# (PostgreSQL and Redis via apt when root, uv via pip, the project via `uv sync`), then every
# command runs compose/local/up.py, which starts the parts exactly as the tests do.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

command="${1:?usage: compose/local/run.sh up|down|status|migrate}"

have_postgres() {
	compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null
}

ensure_system_packages() {
	local missing=()
	have_postgres || missing+=(postgresql)
	command -v redis-server >/dev/null || missing+=(redis-server)
	((${#missing[@]} == 0)) && return 0
	if [[ $EUID -ne 0 ]]; then
		echo "missing: ${missing[*]}; install with: sudo apt-get install -y ${missing[*]}" >&2
		exit 1
	fi
	echo "installing ${missing[*]} ..."
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
}

ensure_uv() {
	command -v uv >/dev/null && return 0
	echo "installing uv with pip ..."
	# Debian's system Python refuses plain `pip install` (PEP 668) unless told otherwise.
	python3 -m pip install --quiet uv || python3 -m pip install --quiet --break-system-packages uv
	export PATH="$HOME/.local/bin:/usr/local/bin:$PATH"
	command -v uv >/dev/null || { echo "uv was installed but is not on PATH" >&2; exit 1; }
}

if [[ $command == up ]]; then
	ensure_system_packages
	ensure_uv
	uv sync --quiet
else
	ensure_uv
fi
exec uv run --quiet python -m compose.local.up "$command"

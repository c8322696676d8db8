#!/usr/bin/env bash
# The one install step of `make up`, `make test`, `make bench` and CI: whatever is missing of
# PostgreSQL, Redis, wrk (the bench's load generator) and uv, then the locked Python
# environment. Installs with apt only as root; otherwise says what to install. Quiet when
# everything is present.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

have_postgres() {
	compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || command -v initdb >/dev/null
}

system_packages() {
	local missing=()
	have_postgres || missing+=(postgresql)
	command -v redis-server >/dev/null || missing+=(redis-server)
	command -v wrk >/dev/null || missing+=(wrk)
	command -v make >/dev/null || missing+=(make)
	command -v uv >/dev/null || python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
	((${#missing[@]} == 0)) && return 0
	if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
		echo "missing: ${missing[*]}; install with: sudo apt-get install -y ${missing[*]}" >&2
		exit 1
	fi
	echo "installing ${missing[*]} ..."
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

uv_tool() {
	command -v uv >/dev/null && return 0
	echo "installing uv with pip ..."
	# Debian's system Python refuses plain `pip install` (PEP 668) unless told otherwise.
	python3 -m pip install --quiet uv || python3 -m pip install --quiet --break-system-packages uv
	command -v uv >/dev/null || { echo "uv was installed but is not on PATH (add ~/.local/bin)" >&2; exit 1; }
}

system_packages
uv_tool
uv sync --frozen --quiet

#!/bin/sh
# Start policyd under Granian on the shared unix socket (policyd reads its NZ_* settings itself).
set -eu

: "${NZ_POLICYD_SOCKET:?NZ_POLICYD_SOCKET must name policyd's unix socket}"
max_body="${NZ_MAX_BODY_BYTES:-8388608}"
case "$max_body" in
	'' | *[!0-9]*)
		echo "NZ_MAX_BODY_BYTES must be a whole number of bytes, got '$max_body'" >&2
		exit 2
		;;
esac

# Caddy sends the body base64-encoded in one header (4/3 of its size); Granian must hold it
# plus the other headers, or it answers 431 / resets the connection.
buffer=$((max_body * 4 / 3 + 65536))

# A stale socket from a previous container would make Granian fail to bind.
rm -f "$NZ_POLICYD_SOCKET"

exec granian --interface asgi --factory \
	--uds "$NZ_POLICYD_SOCKET" --uds-permissions 0660 \
	--workers 1 \
	--http1-buffer-size "$buffer" \
	policyd.authz.app:create_app

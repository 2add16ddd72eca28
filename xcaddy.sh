#!/usr/bin/env bash
# Builds a Caddy binary with flagsplit (and Caddy's standard modules) using xcaddy.
#
#   ./xcaddy.sh          build ./caddy
#   ./xcaddy.sh run      build if needed, then run Caddyfile.example (the demo:
#                        site on :8080, its old/new upstreams on :9001/:9002)
#
# Environment: CADDY_VERSION (default v2.11.9), XCADDY_VERSION (v0.4.5),
# OUTPUT (binary path, default ./caddy), CONFIG (Caddyfile for run).
set -euo pipefail
cd "$(dirname "$0")"

CADDY_VERSION="${CADDY_VERSION:-v2.11.9}"
XCADDY_VERSION="${XCADDY_VERSION:-v0.4.5}"
OUTPUT="${OUTPUT:-./caddy}"
CONFIG="${CONFIG:-Caddyfile.example}"
MODULE=github.com/flagsplit/flagsplit

# The module path is not published: keep the go command from asking the module
# proxy or a VCS for it; xcaddy's replace directive points it at this checkout.
export GOPRIVATE="${GOPRIVATE:+$GOPRIVATE,}$MODULE"
export GOVCS="${GOVCS:-$MODULE:off,*:git}"
export GOFLAGS="${GOFLAGS:-} -buildvcs=false"

xcaddy_bin() {
	if command -v xcaddy >/dev/null 2>&1; then
		command -v xcaddy
		return
	fi
	local bin
	bin="$(go env GOPATH)/bin/xcaddy"
	if [ ! -x "$bin" ]; then
		echo "installing xcaddy $XCADDY_VERSION" >&2
		go install "github.com/caddyserver/xcaddy/cmd/xcaddy@$XCADDY_VERSION"
	fi
	echo "$bin"
}

# needs_build: no binary yet, or a Go source (tests aside) or go.mod is newer.
needs_build() {
	[ ! -x "$OUTPUT" ] && return 0
	[ -n "$(find . -path ./bench -prune -o \( \( -name '*.go' ! -name '*_test.go' \) -o -name go.mod -o -name go.sum \) -newer "$OUTPUT" -print -quit)" ]
}

build() {
	echo "building $OUTPUT: Caddy $CADDY_VERSION with $MODULE (first build takes a few minutes)" >&2
	"$(xcaddy_bin)" build "$CADDY_VERSION" --with "$MODULE=." --output "$OUTPUT"
	"$OUTPUT" list-modules --skip-standard >&2
}

case "${1:-build}" in
build)
	build
	;;
run)
	if needs_build; then build; fi
	exec "$OUTPUT" run --config "$CONFIG" --adapter caddyfile
	;;
*)
	echo "usage: $0 [build|run]" >&2
	exit 2
	;;
esac

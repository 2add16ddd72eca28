#!/usr/bin/env bash
# Runs the browser end-to-end test: real posthog-js (pinned in
# package-lock.json) in headless Chromium against Caddy with flagsplit.
#
#   e2e/browser/run.sh [caddy binary]       # default: $CADDY, or a fresh build of ./cmd/caddy
#   E2E_RECORD=flagsapi/testdata/posthogjs e2e/browser/run.sh   # also re-record the fixtures
#
# Installs what it needs from Debian (chromium, nodejs, npm) when missing.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

need() {
	command -v "$1" >/dev/null 2>&1 && return
	local sudo=""
	[ "$(id -u)" = 0 ] || sudo="sudo"
	$sudo apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${@:2}"
}
need chromium chromium
need node nodejs
need npm npm

caddy="${1:-${CADDY:-}}"
if [ -z "$caddy" ]; then
	caddy="$(mktemp -d)/caddy"
	(cd "$repo" && go build -o "$caddy" ./cmd/caddy)
fi
caddy="$(cd "$(dirname "$caddy")" && pwd)/$(basename "$caddy")"

cd "$here"
# puppeteer-core downloads no browser; the Debian chromium is used.
PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error
args=(--caddy "$caddy")
if [ -n "${E2E_RECORD:-}" ]; then
	args+=(--record "$(cd "$repo" && mkdir -p "$E2E_RECORD" && cd "$E2E_RECORD" && pwd)")
fi
CHROMIUM="${CHROMIUM:-$(command -v chromium)}" node e2e.mjs "${args[@]}"

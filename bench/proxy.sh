#!/usr/bin/env bash
# Measures flagsplit inside Caddy against plain reverse_proxy, side by side.
#
#   bench/proxy.sh
#
# Builds the Caddy binary once (./cmd/caddy), starts on loopback one upstream
# server and six Caddy configurations from that binary:
#   a) plain reverse_proxy to the upstream,
#   b) the same with the feature_flags handler evaluating 5 flags (a rollout, a
#      multivariate flag, three with property filters) and lb_policy feature_flag,
#   c) like b with 50 flags,
#   d) for reference, (a) with the six request headers (b) adds set by
#      header_up: what carrying the headers to the upstream costs by itself,
#   e) like b with `headers dictionary` (one X-Feature-Flags header),
#   f) like c with `headers dictionary`,
# and drives them with wrk in alternating rounds (a b c d e f a b c d e f ...) so machine
# noise hits all alike. Every request carries a distinct id drawn from 100,000
# users (a wrk Lua script sets the header per request). Prints requests/s,
# p50/p99 latency and the CPU time the proxy process spent per request (from
# /proc, so it does not count wrk or the upstream), per configuration, with the
# ratios to (a) taken round by round. Stops every process it started.
#
# Environment: ROUNDS (default 5), DURATION per round (10s), CONNECTIONS (32),
# THREADS (1), WARMUP per configuration before the rounds (10s), CACHE_SIZE of
# configurations b, c, e and f (100000), BASE_PORT (18080; the eight ports from
# there on must be free).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS="${ROUNDS:-5}"
DURATION="${DURATION:-10s}"
CONNECTIONS="${CONNECTIONS:-32}"
THREADS="${THREADS:-1}"
WARMUP="${WARMUP:-10s}"
CACHE_SIZE="${CACHE_SIZE:-100000}"

if ! command -v wrk >/dev/null 2>&1; then
	echo "installing wrk" >&2
	sudo=""
	[ "$(id -u)" = 0 ] || sudo="sudo"
	$sudo apt-get update -qq && $sudo apt-get install -y -qq wrk >/dev/null
fi

work="$(mktemp -d)"
pids=()
cleanup() {
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "building the Caddy binary with flagsplit" >&2
go build -o "$work/caddy" ./cmd/caddy

BASE_PORT="${BASE_PORT:-18080}"
UP1=$BASE_PORT UP2=$((BASE_PORT + 1)) PA=$((BASE_PORT + 2)) PB=$((BASE_PORT + 3)) PC=$((BASE_PORT + 4)) PD=$((BASE_PORT + 5))
PE=$((BASE_PORT + 6)) PF=$((BASE_PORT + 7))

# Definitions: (b) five flags; (c) fifty, the same five kinds repeated.
flag_json() { # index kind
	local key="flag-$1" filters
	case $2 in
	0) filters='{"groups": [{"properties": [], "rollout_percentage": 45}]}' ;;
	1) filters='{"groups": [{"properties": [], "rollout_percentage": 100}], "multivariate": {"variants": [{"key": "control", "rollout_percentage": 50}, {"key": "b", "rollout_percentage": 25}, {"key": "c", "rollout_percentage": 25}]}}' ;;
	2) filters='{"groups": [{"properties": [{"key": "plan", "operator": "exact", "value": ["pro", "enterprise"]}], "rollout_percentage": 50}]}' ;;
	3) filters='{"groups": [{"properties": [{"key": "country", "operator": "is_not", "value": "FR"}, {"key": "orders", "operator": "gte", "value": 5}]}]}' ;;
	4) filters='{"groups": [{"properties": [{"key": "app_version", "operator": "semver_gte", "value": "2.0.0"}], "rollout_percentage": 80}]}' ;;
	esac
	printf '{"id": %d, "key": "%s", "active": true, "filters": %s}' "$(($1 + 1))" "$key" "$filters"
}
definitions() { # count file
	{
		printf '{"flags": ['
		for ((i = 0; i < $1; i++)); do
			[ "$i" -gt 0 ] && printf ','
			flag_json "$i" $((i % 5))
		done
		printf '], "group_type_mapping": {}, "cohorts": {}}\n'
	} >"$2"
}
definitions 5 "$work/flags-5.json"
definitions 50 "$work/flags-50.json"

global='admin off
	auto_https off
	skip_install_trust
	grace_period 1s'

cat >"$work/upstream.caddyfile" <<EOF
{
	$global
}
:$UP1, :$UP2 {
	respond "ok" 200
}
EOF

cat >"$work/a.caddyfile" <<EOF
{
	$global
}
:$PA {
	reverse_proxy 127.0.0.1:$UP1 127.0.0.1:$UP2
}
EOF

flags_config() { # port definitions headers-form
	cat <<EOF
{
	$global
	feature_flags {
		definitions $2
		cache_size $CACHE_SIZE
	}
}
:$1 {
	feature_flags {
		person_property plan {header.X-Plan}
		person_property country {header.X-Country}
		person_property orders {header.X-Orders}
		person_property app_version {header.X-App-Version}
		headers $3
	}
	reverse_proxy 127.0.0.1:$UP1 127.0.0.1:$UP2 {
		lb_policy feature_flag flag-0 {
			true 127.0.0.1:$UP2
			default 127.0.0.1:$UP1
		}
	}
}
EOF
}
flags_config "$PB" "$work/flags-5.json" per_flag >"$work/b.caddyfile"
flags_config "$PC" "$work/flags-50.json" per_flag >"$work/c.caddyfile"
flags_config "$PE" "$work/flags-5.json" dictionary >"$work/e.caddyfile"
flags_config "$PF" "$work/flags-50.json" dictionary >"$work/f.caddyfile"

cat >"$work/d.caddyfile" <<EOF
{
	$global
}
:$PD {
	reverse_proxy 127.0.0.1:$UP1 127.0.0.1:$UP2 {
		header_up X-Posthog-Distinct-Id {header.X-POSTHOG-DISTINCT-ID}
		header_up X-Feature-Flag-Flag-0 true
		header_up X-Feature-Flag-Flag-1 control
		header_up X-Feature-Flag-Flag-2 true
		header_up X-Feature-Flag-Flag-3 true
		header_up X-Feature-Flag-Flag-4 true
	}
}
EOF

cat >"$work/users.lua" <<'EOF'
-- Each request is a random one of 100,000 users, with the properties the
-- flags filter on.
math.randomseed(os.time())
wrk.headers["X-Plan"] = "pro"
wrk.headers["X-Country"] = "US"
wrk.headers["X-Orders"] = "12"
wrk.headers["X-App-Version"] = "2.3.1"
request = function()
	wrk.headers["X-POSTHOG-DISTINCT-ID"] = "user-" .. math.random(1, 100000)
	return wrk.format(nil, "/")
end
EOF

# Caddy binds with SO_REUSEPORT: a leftover process on one of these ports would
# silently share the traffic, so refuse to start if anything answers there.
for p in "$UP1" "$UP2" "$PA" "$PB" "$PC" "$PD" "$PE" "$PF"; do
	if curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$p/"; then
		echo "port $p is already in use; stop what runs there or set BASE_PORT" >&2
		exit 1
	fi
done

declare -A pid_of
start() { # name config
	"$work/caddy" run --config "$2" --adapter caddyfile >"$work/$1.log" 2>&1 &
	pids+=($!)
	pid_of[$1]=$!
}

# cpu_ticks is a process's user+system CPU time so far, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))
start upstream "$work/upstream.caddyfile"
start a "$work/a.caddyfile"
start b "$work/b.caddyfile"
start c "$work/c.caddyfile"
start d "$work/d.caddyfile"
start e "$work/e.caddyfile"
start f "$work/f.caddyfile"

wait_for() { # port
	for _ in $(seq 1 100); do
		curl -fs -o /dev/null "http://127.0.0.1:$1/" -H 'X-POSTHOG-DISTINCT-ID: probe' && return
		sleep 0.1
	done
	echo "port $1 did not answer; logs in $work" >&2
	exit 1
}
for p in "$UP1" "$UP2" "$PA" "$PB" "$PC" "$PD" "$PE" "$PF"; do wait_for "$p"; done

port_of() { case $1 in a) echo "$PA" ;; b) echo "$PB" ;; c) echo "$PC" ;; d) echo "$PD" ;; e) echo "$PE" ;; f) echo "$PF" ;; esac; }

run_wrk() { # config duration
	wrk -t"$THREADS" -c"$CONNECTIONS" -d"$2" --latency -s "$work/users.lua" "http://127.0.0.1:$(port_of "$1")/"
}

echo "warming up each configuration for $WARMUP (fills the result cache)" >&2
for cfg in a b c d e f; do run_wrk "$cfg" "$WARMUP" >/dev/null; done

# to_ms converts wrk's latency spelling (us, ms, s) to milliseconds.
to_ms() {
	awk -v v="$1" 'BEGIN {
		n = v + 0
		if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000
		printf "%.3f", n
	}'
}

results="$work/results.tsv"
: >"$results"
for ((round = 1; round <= ROUNDS; round++)); do
	for cfg in a b c d e f; do
		ticks0=$(cpu_ticks "${pid_of[$cfg]}")
		out="$(run_wrk "$cfg" "$DURATION")"
		ticks1=$(cpu_ticks "${pid_of[$cfg]}")
		requests=$(awk '/requests in/ {print $1}' <<<"$out")
		cpu=$(awk -v t=$((ticks1 - ticks0)) -v us="$TICK_US" -v n="$requests" 'BEGIN {printf "%.1f", t * us / n}')
		rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
		p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
		p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
		errors=$(awk '/Non-2xx or 3xx responses:/ {print $5} /Socket errors:/ {print "socket"}' <<<"$out")
		if [ -n "$errors" ]; then
			echo "round $round $cfg: errors in wrk output:" >&2
			echo "$out" >&2
			exit 1
		fi
		printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$cfg" "$rps" "$(to_ms "$p50")" "$(to_ms "$p99")" "$cpu" >>"$results"
		printf 'round %d %s: %s req/s, p50 %s, p99 %s, proxy CPU %s us/request\n' "$round" "$cfg" "$rps" "$p50" "$p99" "$cpu" >&2
	done
done

awk -F'\t' -v rounds="$ROUNDS" -v d="$DURATION" -v c="$CONNECTIONS" -v t="$THREADS" -v cache="$CACHE_SIZE" '
function median(arr, n,   i, j, tmp) {
	for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (arr[j] < arr[i]) { tmp = arr[i]; arr[i] = arr[j]; arr[j] = tmp }
	return (n % 2) ? arr[(n + 1) / 2] : (arr[n / 2] + arr[n / 2 + 1]) / 2
}
{ rps[$2, $1] = $3; p50[$2, $1] = $4; p99[$2, $1] = $5; cpu[$2, $1] = $6 }
END {
	split("a b c d e f", cfgs, " ")
	names["a"] = "a) reverse_proxy"; names["b"] = "b) + feature_flags, 5 flags"; names["c"] = "c) + feature_flags, 50 flags"
	names["d"] = "d) reverse_proxy + the 6 headers of (b) via header_up"
	names["e"] = "e) + feature_flags, 5 flags, headers dictionary"; names["f"] = "f) + feature_flags, 50 flags, headers dictionary"
	for (k = 1; k <= 6; k++) {
		cfg = cfgs[k]
		for (i = 1; i <= rounds; i++) {
			r[i] = rps[cfg, i]; x[i] = p50[cfg, i]; y[i] = p99[cfg, i]; z[i] = cpu[cfg, i]
			# Ratios are taken round by round, against the (a) run next to it.
			rr[i] = rps[cfg, i] / rps["a", i]; ry[i] = p99[cfg, i] / p99["a", i]; rz[i] = cpu[cfg, i] / cpu["a", i]
		}
		mr[cfg] = median(r, rounds); m50[cfg] = median(x, rounds); m99[cfg] = median(y, rounds); mc[cfg] = median(z, rounds)
		qr[cfg] = median(rr, rounds); q99[cfg] = median(ry, rounds); qc[cfg] = median(rz, rounds)
	}
	printf "wrk -t%s -c%s -d%s, %d alternating rounds (a b c d e f a b c d e f ...), 100,000 distinct ids, cache_size %s;\n", t, c, d, rounds, cache
	printf "medians over the rounds; ratios are medians of each round against its own (a) run\n\n"
	printf "| configuration | requests/s | p50 ms | p99 ms | proxy CPU us/request | throughput vs a | p99 vs a | CPU vs a |\n"
	printf "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
	for (k = 1; k <= 6; k++) {
		cfg = cfgs[k]
		printf "| %s | %.0f | %.2f | %.2f | %.1f | %.3f | %.3f | %.3f |\n", names[cfg], mr[cfg], m50[cfg], m99[cfg], mc[cfg], qr[cfg], q99[cfg], qc[cfg]
	}
}' "$results"

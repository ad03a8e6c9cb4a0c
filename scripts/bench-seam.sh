#!/usr/bin/env bash
# Before/after of one jitbroker change on the issuance benchmark, alternating the two builds
# (before, after, before, after, ...) so that machine drift shows in both columns. Each run is what
# scripts/bench.sh does for jitbroker, with prebuilt release binaries and nothing built here:
# a fresh temp data dir prepared by jb_prepare_dev (flood limits lifted), `jitbroker dev` on free
# 127.0.0.1 ports, ready on /readyz, then `jitbroker-load` (the same pair's) for the task flow
# (SECONDS) and the no-op floor (SECONDS/2), then one paced flow run (--rate, Poisson arrivals,
# the load generator's default) at half of the first "before" flow's rate, the same rate for every
# run so the latencies compare. The store size is the load generator's `store bytes` (the db
# directory) and `du -sb` of the whole data dir, both after the flow run. The load average is
# taken before each run.
#
#   BEFORE_BIN=… BEFORE_LOAD=… AFTER_BIN=… AFTER_LOAD=… scripts/bench-seam.sh [AGENTS] [K] [SECONDS]
#   JB_SEAM_ROUNDS=2     rounds (each one before run and one after run)
#   JB_SEAM_RATE=R       pace at R issuances/s instead of half of the first before peak
#   JB_SEAM_RATE=0       no paced run
#   JB_SEAM_OUT=DIR      where the raw reports and the summary go (default: a new temp dir)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=ports.sh
source "$root/scripts/ports.sh"
agents=${1:-8}; k=${2:-4}; secs=${3:-20}
floor_secs=$((secs / 2 > 0 ? secs / 2 : 1))
rounds=${JB_SEAM_ROUNDS:-2}
rate=${JB_SEAM_RATE:-}
: "${BEFORE_BIN:?set BEFORE_BIN}" "${BEFORE_LOAD:?set BEFORE_LOAD}" "${AFTER_BIN:?set AFTER_BIN}" "${AFTER_LOAD:?set AFTER_LOAD}"
for b in "$BEFORE_BIN" "$BEFORE_LOAD" "$AFTER_BIN" "$AFTER_LOAD"; do
	[[ -x $b ]] || { echo "not an executable: $b" >&2; exit 1; }
done
out=${JB_SEAM_OUT:-$(mktemp -d /tmp/bench-seam.XXXXXX)}
mkdir -p "$out"
work=$(mktemp -d)
pid=
stop() { jb_stop; } # ports.sh
trap 'stop; rm -rf "$work"' EXIT

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
field() { # FILE REGEX [GROUP]: that capture group (default 1) of the first matching line
	[[ -f $1 ]] || return 0
	sed -nE "s#$2#\\${3:-1}#p" "$1" | head -1
}

echo "== machine: $(nproc) cores, $(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)"
echo "== N=$agents agents, k=$k, ${secs}s flow, ${floor_secs}s floor, ${rounds} rounds; reports in $out"
printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' round build load_avg \
	flow_per_s flow_p50 flow_p99 flow_p999 flow_cpu rss_mib store_mb data_dir_mb \
	floor_per_s paced_rate paced_p50 paced_p99 >"$out/summary.tsv"

one() { # ROUND NAME JITBROKER LOAD
	local r=$1 name=$2 jb=$3 load=$4 d api ops tag la
	tag="r$r-$name"
	d=$work/$tag
	jb_prepare_dev "$jb" "$d"
	api=$(free_port); ops=$(free_port)
	RUST_LOG=warn "$jb" dev --data-dir "$d" --listen "127.0.0.1:$api" --ops-listen "127.0.0.1:$ops" >"$out/$tag-broker.log" 2>&1 &
	pid=$!
	jb_ready "http://127.0.0.1:$ops/readyz" ready
	la=$(loadavg)
	echo "== round $r, $name ($jb), load average $la"
	"$load" --agents "$agents" --k "$k" --data-dir "$d" --addr "127.0.0.1:$api" --seconds "$secs" --pid "$pid" | tee "$out/$tag-flow.txt"
	local data_mb
	data_mb=$(($(du -sb "$d" | cut -f1) / 1000000))
	echo "data dir after the flow: ${data_mb} MB (du -sb)"
	echo "-- floor, load average $(loadavg)"
	"$load" --agents "$agents" --k "$k" --data-dir "$d" --addr "127.0.0.1:$api" --seconds "$floor_secs" --pid "$pid" --noop | tee "$out/$tag-noop.txt"
	local flow_rate
	flow_rate=$(field "$out/$tag-flow.txt" '^issuances/s: ([0-9.]+)')
	if [[ -z $rate ]]; then
		rate=$((flow_rate / 2))
		echo "-- paced rate for every run: $rate issuances/s (half of this run's $flow_rate)"
	fi
	if [[ $rate != 0 ]]; then
		echo "-- paced at $rate issuances/s (poisson), load average $(loadavg)"
		"$load" --agents "$agents" --k "$k" --data-dir "$d" --addr "127.0.0.1:$api" --seconds "$secs" --pid "$pid" --rate "$rate" | tee "$out/$tag-paced.txt"
	fi
	stop
	local f=$out/$tag-flow.txt n=$out/$tag-noop.txt p=$out/$tag-paced.txt lat='latency ms: p50 ([0-9.]+) p99 ([0-9.]+) p99.9 ([0-9.]+)'
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$r" "$name" "$la" \
		"$flow_rate" \
		"$(field "$f" "^issuances $lat")" \
		"$(field "$f" "^issuances $lat" 2)" \
		"$(field "$f" "^issuances $lat" 3)" \
		"$(field "$f" '^server cpu seconds per 1000 rpcs: ([0-9.]+)')" \
		"$(field "$f" '^server peak rss MiB: ([0-9.]+)')" \
		"$(($(field "$f" '^store bytes: ([0-9]+)') / 1000000))" \
		"$data_mb" \
		"$(field "$n" '^no-op calls/s: ([0-9.]+)')" \
		"$(field "$p" '^issuances/s: ([0-9.]+)')" \
		"$(field "$p" "^issuances $lat")" \
		"$(field "$p" "^issuances $lat" 2)" >>"$out/summary.tsv"
	rm -rf "$d"
}

for r in $(seq 1 "$rounds"); do
	one "$r" before "$BEFORE_BIN" "$BEFORE_LOAD"
	one "$r" after "$AFTER_BIN" "$AFTER_LOAD"
done
echo "== load average at the end $(loadavg)"
echo "== summary ($out/summary.tsv)"
column -t -s $'\t' "$out/summary.tsv"

#!/usr/bin/env bash
# Issue latency at paced rates: for each RATE (issuances/s), one 20 s task flow with Poisson
# arrivals and one with evenly spread arrivals, each against a fresh `jitbroker dev` store on free
# 127.0.0.1 ports (flood limits lifted: the load is one address). Prebuilt release binaries.
#
#   scripts/bench-paced.sh RATE [RATE ...]
#   JB=path/to/jitbroker LOAD=path/to/jitbroker-load   other builds (default target/release)
#   JB_PACED_AGENTS=8 JB_PACED_K=4 JB_PACED_SECONDS=20
#   JB_PACED_WARM=20        first run the task flow at full speed this many seconds on the same
#                           store (a store with history: audit archival has work to do), then pace
#   JB_PACED_ARRIVALS="poisson even"   which arrival processes to run
#   JB_PACED_CONFIG='[retention]\naudit_entries_in_store = 100000000'   lines added to the
#                           broker's configuration (printf escapes), e.g. to keep archival idle
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=ports.sh
source "$root/scripts/ports.sh"
jb=${JB:-$root/target/release/jitbroker}
load=${LOAD:-$root/target/release/jitbroker-load}
agents=${JB_PACED_AGENTS:-8}; k=${JB_PACED_K:-4}; secs=${JB_PACED_SECONDS:-20}
warm=${JB_PACED_WARM:-0}; arrivals_list=${JB_PACED_ARRIVALS:-poisson even}
[[ $# -gt 0 ]] || { echo "usage: $0 RATE [RATE ...]" >&2; exit 2; }
work=$(mktemp -d)
pid=
trap 'jb_stop; rm -rf "$work"' EXIT
for rate in "$@"; do
	for arrivals in $arrivals_list; do
		d=$work/$rate-$arrivals
		jb_prepare_dev "$jb" "$d"
		if [[ -n ${JB_PACED_CONFIG:-} ]]; then
			# shellcheck disable=SC2059 # the value is a printf format on purpose
			printf "\n$JB_PACED_CONFIG\n" >>"$d/jitbroker.toml"
		fi
		api=$(free_port); ops=$(free_port)
		RUST_LOG=warn "$jb" dev --data-dir "$d" --listen "127.0.0.1:$api" --ops-listen "127.0.0.1:$ops" >"$work/broker.log" 2>&1 &
		pid=$!
		jb_ready "http://127.0.0.1:$ops/readyz" ready
		if [[ $warm != 0 ]]; then
			echo "== full-speed flow for ${warm} s first, on the same store"
			"$load" --agents "$agents" --k "$k" --data-dir "$d" --addr "127.0.0.1:$api" --seconds "$warm" \
				--pid "$pid" | grep -E '^issuances'
		fi
		echo "== rate $rate, $arrivals arrivals, load average $(cut -d' ' -f1-3 /proc/loadavg)"
		"$load" --agents "$agents" --k "$k" --data-dir "$d" --addr "127.0.0.1:$api" --seconds "$secs" \
			--pid "$pid" --rate "$rate" --arrivals "$arrivals" | grep -E '^issuances|cpu'
		jb_stop
		rm -rf "$d"
	done
done

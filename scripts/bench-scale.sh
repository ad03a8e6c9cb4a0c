#!/usr/bin/env bash
# Scale runs for BENCHMARKS.md (never run by CI):
#   (a) restart with N live credentials: time from process start to /readyz 200 (first start
#       after the bulk load, after a SIGKILL right after it, after a graceful stop, after a
#       SIGKILL following 5 s of serving), RSS, store size;
#   (b) mass expiry: N credentials that all expire at the same moment while agents issue:
#       issuance p50/p99 before the moment and during the reaper's storm, and how long the
#       reaper takes to end them all.
#   scripts/bench-scale.sh [N] [AGENTS]      (default 1000000 credentials, 8 agents)
#   (c) churn: L live credentials (JB_CHURN_LIVE, default 100000), then the task flow for
#       JB_CHURN_ROUNDS rounds of 30 s (issue and revoke far more than is live), retention
#       compressed (ended records kept JB_CHURN_RETENTION s, the newest JB_CHURN_AUDIT_KEEP audit
#       entries in the store): the store's size after each round against the live data's.
#   JB_SCALE_PARTS="a b c"                   which runs to do (default all)
#   JB=path/to/jitbroker LOAD=path/to/jitbroker-load   prebuilt binaries instead of this tree's
#   JB_SCALE_CACHE_MB=M                      (a) with sled's page cache set to M MiB
# The credentials are written straight into the stopped store by `jitbroker-load --prefill`
# (sealed, indexed, on the expiry index: the same Store the broker uses).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
n=${1:-1000000}
agents=${2:-8}
cd "$root"
# JB=… LOAD=…: other prebuilt binaries (e.g. a before/after pair); otherwise this tree's, built now.
if [[ -z ${JB:-} ]]; then
	cargo build --release --locked --bin jitbroker --bin jitbroker-load >/dev/null
fi
jb=${JB:-target/release/jitbroker}
load=${LOAD:-target/release/jitbroker-load}
work=$(mktemp -d /tmp/jb-scale.XXXXXX)
pid=
stop() { jb_stop; } # ports.sh
trap 'stop; rm -rf "$work"' EXIT
# shellcheck source=ports.sh
source "$root/scripts/ports.sh"
now_ms() { date +%s%3N; }
api=$(free_port)
ops=$(free_port)
start_broker() { # $1: data dir; sets pid and ready_ms (from exec to /readyz 200)
	local t0 t1
	t0=$(now_ms)
	RUST_LOG=warn "$jb" dev --data-dir "$1" --listen "127.0.0.1:$api" --ops-listen "127.0.0.1:$ops" >>"$work/broker.log" 2>&1 &
	pid=$!
	until curl -fsS "http://127.0.0.1:$ops/readyz" >/dev/null 2>&1; do
		kill -0 "$pid" 2>/dev/null || {
			cat "$work/broker.log" >&2
			exit 1
		}
		sleep 0.02
	done
	t1=$(now_ms)
	ready_ms=$((t1 - t0))
}
rss_mib() { awk '/VmRSS/{printf "%.0f", $2/1024}' "/proc/$1/status"; }
du_mb() { du -sb "$1" | awk '{printf "%.0f", $1/1e6}'; }

echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; N=$n"

parts=${JB_SCALE_PARTS:-a b c}
rate=${JB_SCALE_RATE:-7000} # prefill credentials/s, measured by (a) when it runs

# (a) restart with N live credentials.
if [[ " $parts " == *" a "* ]]; then
d="$work/a"
start_broker "$d" # creates the dev dir, config, KEK
stop
jb_prepare_dev "$jb" "$d" # the load is one address and a few identities: lift the flood limits
# JB_SCALE_CACHE_MB: sled's page cache for this part ([store] cache_mb; default 256).
[[ -n ${JB_SCALE_CACHE_MB:-} ]] && printf '[store]\ncache_mb = %s\n' "$JB_SCALE_CACHE_MB" >>"$d/jitbroker.toml"
"$load" --data-dir "$d" --prefill "$n" --prefill-ttl-seconds 86400 | tee "$work/prefill-a.txt"
rate=$(awk '/prefill seconds/{gsub(/[(]/,"",$4); print $4}' "$work/prefill-a.txt")
start_broker "$work/empty"
empty_ms=$ready_ms
stop
# First start after the bulk load: sled replays everything written since its last snapshot.
start_broker "$d"
first_ms=$ready_ms
sleep 1
echo "(a) first start after writing $n credentials (log replayed, as after a crash): ${first_ms} ms (an empty store: ${empty_ms} ms)"
# SIGKILL right after that start: sled wrote a fresh snapshot while opening, so the next start
# has almost nothing to replay and measures the recount of live entries a crash forces.
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
pid=
start_broker "$d"
echo "(a) restart-to-ready after SIGKILL right after that start (nothing to replay; the recount): ${ready_ms} ms"
sleep 1
echo "(a) RSS after ready: $(rss_mib "$pid") MiB; store: $(du_mb "$d/db") MB ($(($(du -sb "$d/db" | cut -f1) / n)) bytes per live credential)"
"$load" --addr "127.0.0.1:$api" --data-dir "$d" --agents "$agents" --k 4 --seconds 5 --pid "$pid" | sed 's/^/(a) serving: /'
echo "(a) RSS after serving: $(rss_mib "$pid") MiB"
t0=$(now_ms)
stop # SIGTERM: graceful, ends with the snapshot refresh
echo "(a) graceful stop (drain, flush, snapshot refresh): $(($(now_ms) - t0)) ms"
start_broker "$d"
echo "(a) restart-to-ready with $n live credentials after a graceful stop: ${ready_ms} ms"
"$load" --addr "127.0.0.1:$api" --data-dir "$d" --agents "$agents" --k 4 --seconds 5 --pid "$pid" | grep -E 'issuances' | sed 's/^/(a) serving after the restart: /'
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
pid=
start_broker "$d"
echo "(a) restart-to-ready after SIGKILL (5 s of serving to replay): ${ready_ms} ms"
stop
fi

# (c) churn over a live set: L live credentials (prefilled, a day's TTL) while agents issue and
# revoke far more than is live, with a compressed retention window for ended records and a
# bounded audit tail in the store (older entries go to archive segments beside it).
if [[ " $parts " == *" c "* ]]; then
d="$work/c"
live_n=${JB_CHURN_LIVE:-100000}
start_broker "$d"
stop
jb_prepare_dev "$jb" "$d" # the load is one address and a few identities: lift the flood limits
printf '[retention]\nended_records_seconds = %s\naudit_entries_in_store = %s\naudit_segment_entries = %s\n' \
	"${JB_CHURN_RETENTION:-10}" "${JB_CHURN_AUDIT_KEEP:-100000}" "${JB_CHURN_AUDIT_SEGMENT:-50000}" >>"$d/jitbroker.toml"
"$load" --data-dir "$d" --prefill "$live_n" --prefill-ttl-seconds 86400 >/dev/null
start_broker "$d"
live_mb=$(du_mb "$d/db")
echo "(c) live data: $live_n credentials; store $live_mb MB"
total=0
for round in $(seq 1 "${JB_CHURN_ROUNDS:-8}"); do
	out=$("$load" --addr "127.0.0.1:$api" --data-dir "$d" --agents "$agents" --k 4 --seconds 30 --pid "$pid")
	issued=$(awk '/^issuances\/s/{print $2}' <<<"$out")
	total=$(python3 -c "print(int($total + float('$issued') * 30))")
	live=$(curl -fsS "http://127.0.0.1:$ops/metrics" | awk '/^jitbroker_active_credentials /{print $2}')
	store_mb=$(du_mb "$d/db")
	arch_mb=0
	[[ -d $d/audit-archive ]] && arch_mb=$(du_mb "$d/audit-archive")
	echo "(c) round $round: ${issued} issuances/s; issued so far $total; live credentials $live; store $store_mb MB ($(python3 -c "print(f'{$store_mb / $live_mb:.2f}')")x the live data); audit archive $arch_mb MB"
done
stop
fi
[[ " $parts " == *" b "* ]] || exit 0

# (b) N credentials expiring together while agents issue.
d="$work/b"
start_broker "$d"
stop
jb_prepare_dev "$jb" "$d" # the load is one address and a few identities: lift the flood limits
fill_s=$(python3 -c "print(int($n / max(float('$rate'), 1.0)) + 1)")
ttl=$((fill_s + 60))
t_fill=$(now_ms)
"$load" --data-dir "$d" --prefill "$n" --prefill-ttl-seconds "$ttl" >"$work/prefill-b.txt"
expire_at=$((t_fill + ttl * 1000))
start_broker "$d"
left=$(((expire_at - $(now_ms)) / 1000 - 2))
if ((left < 6)); then
	echo "(b) prefill ran slower than (a); not enough time before the expiry" >&2
	exit 1
fi
before=$((left < 20 ? left : 20))
echo "(b) before the storm ($before s):"
"$load" --addr "127.0.0.1:$api" --data-dir "$d" --agents "$agents" --k 4 --seconds "$before" --pid "$pid" | grep -E 'issuances' | sed 's/^/    /'
while (($(now_ms) < expire_at)); do sleep 0.05; done
echo "(b) during the storm (20 s from the moment $n credentials expire):"
"$load" --addr "127.0.0.1:$api" --data-dir "$d" --agents "$agents" --k 4 --seconds 20 --pid "$pid" | grep -E 'issuances|cpu' | sed 's/^/    /'
# How long the reaper takes to end them all: active credentials on /metrics.
until [[ $(curl -fsS "http://127.0.0.1:$ops/metrics" | awk '/^jitbroker_active_credentials /{print $2}') == 0 ]]; do
	sleep 1
done
echo "(b) reaper drained $n expired credentials in $((($(now_ms) - expire_at) / 1000)) s"
echo "(b) store after the storm: $(du_mb "$d/db") MB"

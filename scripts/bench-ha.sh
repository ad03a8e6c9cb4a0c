#!/usr/bin/env bash
# Issuance with several replicas on PostgreSQL, next to the single-node sled broker, in one run on
# 127.0.0.1 free ports in a temp dir, one configuration at a time, the same N agents, k and
# duration for each:
#   sled       a release `jitbroker dev` as scripts/bench.sh runs it (sled, every reply waits for
#              the group-commit flush);
#   pg-1       one PostgreSQL primary (fsync on, synchronous_commit on) and one replica
#              (`jitbroker serve`, [store] engine = "postgres");
#   pg-3       the same primary and three replicas, agent i on replica i mod 3;
#   pg-3-sync  the same primary with one synchronous streaming standby (pg_basebackup -R into a
#              second data dir, its own port, application_name in primary_conninfo, named by the
#              primary's synchronous_standby_names; pg_stat_replication must show sync_state
#              'sync' before the load) and three replicas: every commit also waits for the
#              standby's WAL flush.
# Each PostgreSQL configuration gets a new database on the primary; its replicas share one data
# dir (the dev CA and the KEK) and are each ready on /readyz before the load. For each
# configuration: the task flow as fast as it is answered (StartTask, K x IssueCredential,
# Introspect, CompleteTask): issuances/s and the issuance latency p50/p99; then the same flow
# paced at half of that configuration's own peak (jitbroker-load --rate, Poisson arrivals, as
# scripts/bench-seam.sh does): its p50/p99.
#
# How to read it. Every process (replicas, PostgreSQL, its standby, the load generator) shares
# this machine's cores and disk. Three replicas add no CPU here: pg-3 against pg-1 is what
# spreading the same CPU over three processes costs or gains (more connections, more concurrent
# transactions for PostgreSQL to group into one WAL flush), not how a deployment scales out.
# sled against pg-1 is the price of a database round trip per unit of work and of PostgreSQL's
# commit. pg-3-sync against pg-3 is the price of the synchronous standby; on one machine that is
# a second WAL flush on the same disk, without the network round trip a real standby adds. The
# paced rows compare the configurations at the same share of each one's own capacity, not at the
# same rate. The PostgreSQL runs send idempotency keys (the load generator does with several
# addresses; pg-1 asks for them with --idempotency-keys), so the three do the same work; the
# sled run does not, as in scripts/bench.sh. `retries` counts calls sent again to the next
# replica after UNAVAILABLE or a lost connection: nothing is killed here, so it should be 0.
# `store bytes` in the PostgreSQL reports is the primary's whole data directory (every database
# of the run and its WAL).
#
#   scripts/bench-ha.sh [AGENTS] [K] [SECONDS]
#   JB_HA_STANDBY=0   skip pg-3-sync
#   JB_HA_POOL=16     [store] pool_size of each replica (two pools of it per replica)
#   JB_HA_REAP=10000  credentials left overdue while no replica runs, then reaped by one (0: skip)
#
# Prints a markdown table and writes it, followed by the raw reports, to target/bench/ha.md
# (the raw reports also stay in target/bench/ha/). PostgreSQL runs as the `postgres` user when
# this runs as root; its binaries: $JITBROKER_PG_BIN, else the newest /usr/lib/postgresql/*/bin.
# A configuration that cannot run here is reported as such and the others still run. Needs
# curl, python3 and psql.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
agents=${1:-8}; k=${2:-4}; secs=${3:-20}
with_standby=${JB_HA_STANDBY:-1}
pool=${JB_HA_POOL:-16}
cd "$root"
cargo build --release --locked --bins >/dev/null
jb=$root/target/release/jitbroker
load=$root/target/release/jitbroker-load
out=$root/target/bench
raw=$out/ha
mkdir -p "$raw"
rm -f "$raw"/*.txt "$raw"/*.log
work=$(mktemp -d /tmp/jb-benchha.XXXXXX)
chmod 755 "$work"
# shellcheck source=ports.sh
source "$root/scripts/ports.sh"

as_root=0
[[ $(id -u) == 0 ]] && as_root=1
as_pg() { if [[ $as_root == 1 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
bin=${JITBROKER_PG_BIN:-$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -1)}
primary=$work/pg/primary
standby=$work/pg/standby

# Every broker process started is listed in $work/pids (configurations run in subshells, see
# `attempt`); stop_brokers ends them by id.
: >"$work/pids"
stop_brokers() {
	local p
	while read -r p; do kill "$p" 2>/dev/null || true; done <"$work/pids"
	while read -r p; do
		for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
		kill -9 "$p" 2>/dev/null || true
	done <"$work/pids"
	: >"$work/pids"
}
cleanup() {
	stop_brokers
	for d in "$standby" "$primary"; do
		[[ -f $d/postmaster.pid ]] && as_pg "$bin/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1 || true
	done
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
field() { # FILE REGEX [GROUP]: that capture group (default 1) of the first matching line
	[[ -f $1 ]] || return 0
	sed -nE "s#$2#\\${3:-1}#p" "$1" | head -1
}
run() { # NAME ARGS...: one load-generator run, report to $raw/NAME.txt and stdout
	local name=$1
	shift
	"$load" --agents "$agents" --k "$k" --seconds "$secs" "$@" | tee "$raw/$name.txt"
}
# measure NAME ARGS...: the flow at full speed, then paced at half of its issuances/s.
measure() {
	local name=$1 peak rate
	shift
	echo "== $name: task flow (StartTask, $k x IssueCredential, Introspect, CompleteTask), load average $(loadavg)"
	run "$name-flow" "$@"
	peak=$(field "$raw/$name-flow.txt" '^issuances/s: ([0-9]+)')
	rate=$((peak / 2))
	if [[ $rate == 0 ]]; then
		echo "-- $name: no paced run (peak $peak issuances/s)"
		return 0
	fi
	echo "== $name: paced at $rate issuances/s (half of $peak, poisson), load average $(loadavg)"
	run "$name-paced" "$@" --rate "$rate"
}
# attempt NAME FUNCTION ARGS...: runs FUNCTION in a subshell that stops at its first failure;
# a failure is recorded with its reason (a panic's message, else the last line of output) and
# the run goes on.
attempt() {
	local name=$1 rc why
	shift
	set +e
	(
		set -e
		"$@"
	) 2>&1 | tee "$work/attempt.log"
	rc=${PIPESTATUS[0]}
	set -e
	stop_brokers
	if [[ $rc != 0 ]]; then
		why=$(sed -n '/ panicked at /{n;p;q}' "$work/attempt.log")
		[[ -n $why ]] || why=$(grep -v '^\s*$' "$work/attempt.log" | tail -1)
		echo "-- $name failed: $why" | tee -a "$raw/skipped.txt"
	fi
	return 0
}
skip() { # NAME REASON
	echo "-- $1 did not run: $2" | tee -a "$raw/skipped.txt"
}

machine="$(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo); load average at start $(loadavg)"
echo "== machine: $machine"
echo "== N=$agents agents, k=$k, ${secs}s per run (flow, then paced at half its peak)"

# ---- sled: `jitbroker dev`, as scripts/bench.sh ------------------------------------------------
sled() {
	local api ops pid
	api=$(free_port); ops=$(free_port)
	jb_prepare_dev "$jb" "$work/sled"
	RUST_LOG=warn "$jb" dev --data-dir "$work/sled" --listen "127.0.0.1:$api" --ops-listen "127.0.0.1:$ops" >"$raw/sled-broker.log" 2>&1 &
	pid=$!
	echo "$pid" >>"$work/pids"
	jb_ready "http://127.0.0.1:$ops/readyz" ready
	measure sled --data-dir "$work/sled" --addr "127.0.0.1:$api" --pid "$pid"
}
attempt sled sled

# ---- PostgreSQL ---------------------------------------------------------------------------------
pw=$(openssl rand -hex 16 2>/dev/null || python3 -c 'import secrets; print(secrets.token_hex(16))')
pgport=
psql_primary() { PGPASSWORD=$pw psql -h 127.0.0.1 -p "$pgport" -U jbadmin -d postgres -qtAX "$@"; }

start_primary() {
	[[ -x $bin/initdb ]] || { echo "no PostgreSQL server binaries (initdb) in $bin"; return 1; }
	if [[ $as_root == 1 ]]; then
		id postgres >/dev/null 2>&1 || { echo "running as root without a postgres user to run PostgreSQL as"; return 1; }
	fi
	pgport=$(free_port)
	mkdir -p "$work/pg"
	echo "$pw" >"$work/pg/pw"
	[[ $as_root == 1 ]] && chown -R postgres:postgres "$work/pg"
	as_pg "$bin/initdb" -D "$primary" -U jbadmin --pwfile="$work/pg/pw" --auth-host=scram-sha-256 \
		--auth-local=scram-sha-256 -E UTF8 >"$work/pg/initdb.log"
	# Durable like a real database (fsync and synchronous_commit on, the defaults), only on
	# loopback; room for three replicas' two pools and a standby.
	printf "listen_addresses = '127.0.0.1'\nport = %s\nunix_socket_directories = ''\nmax_connections = %s\nfsync = on\nsynchronous_commit = on\n" \
		"$pgport" $((3 * 2 * pool + 20)) >>"$primary/postgresql.conf"
	as_pg "$bin/pg_ctl" -D "$primary" -l "$work/pg/primary.log" -w -t 60 start >/dev/null
	echo "$pgport" >"$work/pg/port"
}

# start_replica CONFIG LOG WHAT: `jitbroker serve` on free ports (sets api, ops, pid), listed in
# $work/pids, ready on /readyz (polled every 50 ms, at most 30 s) or a failure naming WHAT.
start_replica() {
	local config=$1 log=$2 what=$3
	api=$(free_port); ops=$(free_port)
	JITBROKER_LISTEN=127.0.0.1:$api JITBROKER_OPS_LISTEN=127.0.0.1:$ops RUST_LOG=warn \
		"$jb" serve --config "$config" >"$log" 2>&1 &
	pid=$!
	echo "$pid" >>"$work/pids"
	for _ in $(seq 1 600); do
		curl -fsS "http://127.0.0.1:$ops/readyz" 2>/dev/null | grep -q ready && return 0
		kill -0 "$pid" 2>/dev/null || { tail -5 "$log"; echo "$what exited"; return 1; }
		sleep 0.05
	done
	echo "$what not ready in 30 s"
	return 1
}

# replicas NAME COUNT: a new database NAME on the primary, COUNT replicas on it (one data dir,
# one configuration), each ready; sets addrs and pids (comma-separated).
addrs=; pids=
replicas() {
	local name=$1 n=$2 d=$work/jb i api ops pid
	jb_prepare_dev "$jb" "$d"
	psql_primary -c "CREATE DATABASE \"$name\""
	echo "host=127.0.0.1 port=$pgport user=jbadmin password=$pw dbname=$name" >"$d/$name.dsn"
	{
		cat "$d/jitbroker.toml"
		printf '\n[store]\nengine = "postgres"\ndsn_file = "%s"\npool_size = %s\n' "$d/$name.dsn" "$pool"
	} >"$d/$name.toml"
	addrs=; pids=
	for i in $(seq 1 "$n"); do
		start_replica "$d/$name.toml" "$raw/$name-broker-$i.log" "replica $i of $name"
		addrs=${addrs:+$addrs,}127.0.0.1:$api
		pids=${pids:+$pids,}$pid
	done
}

# pg NAME COUNT [LOAD ARGS...]: replicas on a new database, then the two runs.
pg() {
	local name=$1 n=$2
	shift 2
	replicas "$name" "$n"
	measure "$name" --data-dir "$work/jb" --addr "$addrs" --pid "$pids" --store-dir "$primary" "$@"
}

# reap N: every replica down while N credentials expire. A new database gets N live credentials
# with a 1 s lifetime (jitbroker-load --prefill through the engine, as the broker writes them),
# nothing runs for 2 s, then one replica starts: the seconds from its start to ready, and to an
# expiry index with no credential left on it.
reap() {
	local n=$1 d=$work/reap api ops pid t0 ready_s done_s left=
	jb_prepare_dev "$jb" "$d"
	psql_primary -c 'CREATE DATABASE "reap"'
	echo "host=127.0.0.1 port=$pgport user=jbadmin password=$pw dbname=reap" >"$d/reap.dsn"
	{
		cat "$d/jitbroker.toml"
		printf '\n[store]\nengine = "postgres"\ndsn_file = "%s"\npool_size = %s\n' "$d/reap.dsn" "$pool"
	} >"$d/reap.toml"
	"$load" --data-dir "$d" --prefill "$n" --prefill-ttl-seconds 1 --store-config "$d/reap.toml" |
		tee "$raw/reap-prefill.txt"
	sleep 2
	t0=$(date +%s.%N)
	start_replica "$d/reap.toml" "$raw/reap-broker.log" "the reaping replica"
	ready_s=$(python3 -c "import time; print(f'{time.time() - $t0:.2f}')")
	for _ in $(seq 1 1200); do
		left=$(PGPASSWORD=$pw psql -h 127.0.0.1 -p "$pgport" -U jbadmin -d reap -qtAX \
			-c "SELECT count(*) FROM due WHERE kind = 'c'")
		[[ $left == 0 ]] && break
		sleep 0.1
	done
	done_s=$(python3 -c "import time; print(f'{time.time() - $t0:.2f}')")
	[[ $left == 0 ]] || { echo "$left overdue credentials left after 120 s"; return 1; }
	echo "overdue credentials: $n; replica ready after ${ready_s} s; all ended after ${done_s} s (from its start)" |
		tee "$raw/reap.txt"
}

start_standby() {
	local sport state
	sport=$(free_port)
	as_pg env PGPASSWORD="$pw" "$bin/pg_basebackup" -h 127.0.0.1 -p "$pgport" -U jbadmin \
		-D "$standby" -R -X stream -c fast >/dev/null
	# Its own port; application_name in primary_conninfo names it to synchronous_standby_names.
	printf "port = %s\n" "$sport" >>"$standby/postgresql.conf"
	printf "primary_conninfo = 'host=127.0.0.1 port=%s user=jbadmin password=%s application_name=jbstandby'\n" \
		"$pgport" "$pw" >>"$standby/postgresql.auto.conf"
	as_pg "$bin/pg_ctl" -D "$standby" -l "$work/pg/standby.log" -w -t 60 start >/dev/null
	for _ in $(seq 1 100); do
		[[ $(psql_primary -c "SELECT state FROM pg_stat_replication WHERE application_name = 'jbstandby'") == streaming ]] && break
		sleep 0.2
	done
	psql_primary -c "ALTER SYSTEM SET synchronous_standby_names = 'jbstandby'" -c "SELECT pg_reload_conf()" >/dev/null
	for _ in $(seq 1 100); do
		state=$(psql_primary -c "SELECT state || ' ' || sync_state FROM pg_stat_replication WHERE application_name = 'jbstandby'")
		[[ $state == "streaming sync" ]] && break
		sleep 0.2
	done
	echo "standby on port $sport: pg_stat_replication says '${state:-nothing}'"
	[[ $state == "streaming sync" ]] || { echo "the standby is not synchronous (pg_stat_replication: '${state:-no row}')"; return 1; }
	psql_primary -c "SHOW synchronous_standby_names" -c "SHOW synchronous_commit" -c "SHOW fsync" | paste -sd' ' |
		awk '{print "primary: synchronous_standby_names=" $1 " synchronous_commit=" $2 " fsync=" $3}'
}

pg_version=
attempt "PostgreSQL" start_primary
if [[ -s $work/pg/port ]]; then
	pgport=$(cat "$work/pg/port")
	pg_version=$("$bin/postgres" --version | awk '{print $3}')
	echo "== PostgreSQL $pg_version on port $pgport: fsync=$(psql_primary -c 'SHOW fsync'), synchronous_commit=$(psql_primary -c 'SHOW synchronous_commit')"
	attempt pg-1 pg pg-1 1 --idempotency-keys
	attempt pg-3 pg pg-3 3
	if [[ ${JB_HA_REAP:-10000} != 0 ]]; then attempt reap reap "${JB_HA_REAP:-10000}"; fi
	if [[ $with_standby == 1 ]]; then
		attempt "the synchronous standby" start_standby
		if [[ -f $standby/postmaster.pid && $(psql_primary -c "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'jbstandby'") == sync ]]; then
			attempt pg-3-sync pg pg-3-sync 3
		else
			skip pg-3-sync "no synchronous standby"
		fi
	else
		skip pg-3-sync "JB_HA_STANDBY=0"
	fi
else
	for c in pg-1 pg-3 pg-3-sync; do skip "$c" "no PostgreSQL primary"; done
fi

# ---- table --------------------------------------------------------------------------------------
lat='latency ms: p50 ([0-9.]+) p99 ([0-9.]+) p99.9 ([0-9.]+)'
row() { # NAME DESCRIPTION REPLICAS
	local f=$raw/$1-flow.txt p=$raw/$1-paced.txt r1 r2 retries=–
	r1=$(field "$f" '^retries: ([0-9]+)')
	r2=$(field "$p" '^retries: ([0-9]+)')
	[[ -n $r1$r2 ]] && retries=$((${r1:-0} + ${r2:-0}))
	if [[ ! -f $f ]]; then
		printf '| %s | %s | %s | – | – | – | – | – | – | – |\n' "$1" "$2" "$3"
		return
	fi
	printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$1" "$2" "$3" \
		"$(field "$f" '^issuances/s: ([0-9.]+)')" \
		"$(field "$f" "^issuances $lat")" "$(field "$f" "^issuances $lat" 2)" \
		"$(field "$p" '^issuances/s: ([0-9.]+)')" \
		"$(field "$p" "^issuances $lat")" "$(field "$p" "^issuances $lat" 2)" \
		"$retries" | sed 's/|  |/| – |/g; s/|  |/| – |/g'
}
{
	echo "# Replicas on PostgreSQL (scripts/bench-ha.sh)"
	echo
	echo "N=$agents agents, k=$k, ${secs} s per run; PostgreSQL ${pg_version:-not run} (fsync on, synchronous_commit on), pool_size $pool per replica pool."
	echo "Machine: $machine."
	echo
	echo "| configuration | store | replicas | issuances/s | issue p50 ms | issue p99 ms | paced issuances/s (half the peak) | paced p50 ms | paced p99 ms | retries |"
	echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
	row sled "sled, jitbroker dev" 1
	row pg-1 "PostgreSQL primary" 1
	row pg-3 "PostgreSQL primary" 3
	row pg-3-sync "primary + synchronous standby" 3
	if [[ -s $raw/reap.txt ]]; then
		echo
		echo "Every replica down while credentials expired (JB_HA_REAP): $(cat "$raw/reap.txt")."
	fi
	if [[ -s $raw/skipped.txt ]]; then
		echo
		sed 's/^-- /- /' "$raw/skipped.txt"
	fi
} >"$work/table.md"
echo
cat "$work/table.md"
{
	cat "$work/table.md"
	echo
	echo "## Raw reports"
	for f in "$raw"/{sled,pg-1,pg-3,pg-3-sync}-{flow,paced}.txt; do
		[[ -f $f ]] || continue
		echo
		echo "### $(basename "$f" .txt)"
		echo
		echo '```'
		cat "$f"
		echo '```'
	done
} >"$out/ha.md"
echo
echo "== written to $out/ha.md (raw reports in $raw)"

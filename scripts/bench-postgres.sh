#!/usr/bin/env bash
# PostgreSQL credential issuance for BENCHMARKS.md (never run by CI): a throwaway PostgreSQL on a
# free port (as the `postgres` user when run as root), a release `jitbroker dev` with a
# `postgres` resource, and the load generator's task flow issuing real roles
# (StartTask → K × IssueCredential → Introspect → CompleteTask, every role dropped by the
# revocation queue).
#   scripts/bench-postgres.sh [AGENTS] [K] [SECONDS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
agents=${1:-8}; k=${2:-4}; secs=${3:-15}
cd "$root"
cargo build --release --locked --bin jitbroker --bin jitbroker-load >/dev/null
jb=$root/target/release/jitbroker
load=$root/target/release/jitbroker-load
bin=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -1)
work=$(mktemp -d /tmp/jb-pgbench.XXXXXX)
chmod 755 "$work"
as_pg() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
pid=
cleanup() {
	[[ -n $pid ]] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }
	as_pg "$bin/pg_ctl" -D "$work/pg/data" -m immediate -w stop >/dev/null 2>&1 || true
	rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
pgport=$(free_port); api=$(free_port); ops=$(free_port)
pw=$(openssl rand -hex 16)
mkdir -p "$work/pg"
echo "$pw" >"$work/pg/pw"
[[ $(id -u) == 0 ]] && chown -R postgres:postgres "$work/pg"
as_pg "$bin/initdb" -D "$work/pg/data" -U jbadmin --pwfile="$work/pg/pw" --auth-host=scram-sha-256 --auth-local=scram-sha-256 >/dev/null
# Durable like a real database (fsync on), only on loopback.
printf "listen_addresses = '127.0.0.1'\nport = %s\nunix_socket_directories = ''\nmax_connections = 200\n" "$pgport" >>"$work/pg/data/postgresql.conf"
as_pg "$bin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w start >/dev/null
PGPASSWORD=$pw psql -h 127.0.0.1 -p "$pgport" -U jbadmin -d postgres -qc "CREATE TABLE orders (id int, item text); CREATE ROLE orders_reader NOLOGIN; GRANT SELECT ON orders TO orders_reader"
d=$work/jb
RUST_LOG=warn "$jb" dev --data-dir "$d" --listen "127.0.0.1:$api" --ops-listen "127.0.0.1:$ops" >/dev/null 2>&1 &
pid=$!
until curl -fsS "http://127.0.0.1:$ops/readyz" >/dev/null 2>&1; do sleep 0.05; done
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
echo "host=127.0.0.1 port=$pgport user=jbadmin password=$pw dbname=postgres" >"$d/pg-admin.dsn"
cat >>"$d/jitbroker.toml" <<EOF

[resources.orders-db]
kind = "postgres"
actions = ["read"]
verifiers = ["spiffe://jitbroker.dev/tool/demo"]

[resources.orders-db.postgres]
admin_dsn_file = "$d/pg-admin.dsn"
pool_size = ${JB_PG_POOL:-8}

[resources.orders-db.postgres.grants.read]
roles = ["orders_reader"]
EOF
cat >>"$d/policy.cedar" <<'EOF'

@id("load-agents-orders")
permit(principal, action == Action::"read", resource == Resource::"orders-db")
when { principal.spiffe_id like "spiffe://jitbroker.dev/agent/*" };
EOF
JITBROKER_LISTEN=127.0.0.1:$api JITBROKER_OPS_LISTEN=127.0.0.1:$ops RUST_LOG=warn "$jb" serve --config "$d/jitbroker.toml" >"$work/broker.log" 2>&1 &
pid=$!
until curl -fsS "http://127.0.0.1:$ops/readyz" >/dev/null 2>&1; do
	kill -0 "$pid" 2>/dev/null || { cat "$work/broker.log" >&2; exit 1; }
	sleep 0.05
done
echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; PostgreSQL $("$bin/postgres" --version | awk '{print $3}') (fsync on)"
echo "== postgres task flow (StartTask, $k x IssueCredential(orders-db), Introspect, CompleteTask)"
"$load" --addr "127.0.0.1:$api" --data-dir "$d" --agents "$agents" --k "$k" --seconds "$secs" --pid "$pid" --resource orders-db
until [[ $(curl -fsS "http://127.0.0.1:$ops/metrics" | awk '/^jitbroker_revocation_debt /{print $2}') == 0 ]]; do sleep 0.2; done
left=$(PGPASSWORD=$pw psql -h 127.0.0.1 -p "$pgport" -U jbadmin -d postgres -tAc "SELECT count(*) FROM pg_roles WHERE starts_with(rolname, 'jb_')")
echo "roles left after the run and the queue drained: $left"

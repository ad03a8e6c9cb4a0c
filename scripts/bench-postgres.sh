#!/usr/bin/env bash
# PostgreSQL credential issuance for BENCHMARKS.md (never run by CI): a throwaway PostgreSQL on a
# free port (as the `postgres` user when run as root), a release `jitbroker dev` with a
# `postgres` resource, and the load generator's task flow issuing real roles
# (StartTask → K × IssueCredential → Introspect → CompleteTask, every role dropped by the
# revocation queue).
# Then, against the same PostgreSQL and the same group role, OpenBao's database secrets engine in
# dev mode (the binary from scripts/openbao.sh): cert login → K × read of database/creds/orders
# (a role per read, leased to the login token) → lease lookup by the tool → revoke-self (the
# token's leases are revoked with it); then the roles left once its revocations are done.
#   scripts/bench-postgres.sh [AGENTS] [K] [SECONDS]
#   JB_BENCH_OPENBAO=0   jitbroker only
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
# shellcheck source=ports.sh
source "$root/scripts/ports.sh"
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
jb_prepare_dev "$jb" "$d" # one address, a few identities: lift the flood limits
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
kill "$pid"; wait "$pid" 2>/dev/null || true; pid=

[[ ${JB_BENCH_OPENBAO:-1} == 1 ]] || exit 0
# ---- OpenBao's database secrets engine, same PostgreSQL -----------------------------------------
bao=$(scripts/openbao.sh install)
port=$(free_pair)
mkdir -p "$work/bao-tls"
"$bao" server -dev -dev-tls -dev-tls-cert-dir="$work/bao-tls" -dev-listen-address="127.0.0.1:$port" \
	-dev-root-token-id=root -dev-no-store-token -log-level=warn >"$work/bao.log" 2>&1 &
pid=$!
ca=$work/bao-tls/vault-ca.pem
url=https://127.0.0.1:$port
for _ in $(seq 1 100); do [[ -s $ca ]] && curl -fsS --cacert "$ca" "$url/v1/sys/health" >/dev/null 2>&1 && break; sleep 0.2; done
c() { curl -fsS --cacert "$ca" -H "X-Vault-Token: root" -X "$1" "$url/v1/$2" -d "$3" >/dev/null; }
c POST sys/auth/cert '{"type":"cert"}'
c POST sys/mounts/database '{"type":"database"}'
# The same admin user and pool size as the broker's resource; the same group role; revocation
# does what the broker's does (end sessions, DROP OWNED, DROP ROLE) instead of the plugin's
# default per-schema REVOKE sweep.
c POST database/config/pg "$(python3 -c 'import json,sys; print(json.dumps({
	"plugin_name": "postgresql-database-plugin",
	"connection_url": "postgresql://{{username}}:{{password}}@127.0.0.1:%s/postgres?sslmode=disable" % sys.argv[1],
	"username": "jbadmin", "password": sys.argv[2], "allowed_roles": "orders",
	"max_open_connections": int(sys.argv[3]), "verify_connection": True}))' "$pgport" "$pw" "${JB_PG_POOL:-8}")"
c POST database/roles/orders "$(python3 -c 'import json; print(json.dumps({
	"db_name": "pg", "default_ttl": "120s", "max_ttl": "300s",
	"creation_statements": ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '"'"'{{password}}'"'"' VALID UNTIL '"'"'{{expiration}}'"'"'; GRANT orders_reader TO \"{{name}}\";"],
	"revocation_statements": ["SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '"'"'{{name}}'"'"'; DROP OWNED BY \"{{name}}\"; DROP ROLE IF EXISTS \"{{name}}\";"]}))')"
c PUT sys/policies/acl/agent '{"policy":"path \"database/creds/orders\" { capabilities = [\"read\"] }"}'
c PUT sys/policies/acl/tool '{"policy":"path \"sys/leases/lookup\" { capabilities = [\"update\"] }"}'
role() {
	python3 -c 'import json,sys; print(json.dumps({"certificate": open(sys.argv[1]).read(),
		"allowed_uri_sans": [sys.argv[2]], "token_policies": [sys.argv[3]], "token_ttl": "300s"}))' "$d/dev/ca.pem" "$@"
}
c POST auth/cert/certs/agent "$(role 'spiffe://jitbroker.dev/agent/*' agent)"
c POST auth/cert/certs/tool "$(role 'spiffe://jitbroker.dev/tool/*' tool)"
roles_left() { PGPASSWORD=$pw psql -h 127.0.0.1 -p "$pgport" -U jbadmin -d postgres -tAc "SELECT count(*) FROM pg_roles WHERE starts_with(rolname, 'v-')"; }
echo "== OpenBao $("$bao" version | awk '{print $2}') dev, database engine (cert login, $k x read database/creds/orders, lease lookup (tool), revoke-self)"
"$load" --target openbao --addr "127.0.0.1:$port" --server-ca "$ca" --data-dir "$d" --agents "$agents" --k "$k" \
	--seconds "$secs" --pid "$pid" --store-dir "$work/none" --bao-creds database/creds/orders
t0=$(date +%s)
for _ in $(seq 1 600); do [[ $(roles_left) == 0 ]] && break; sleep 0.5; done
echo "OpenBao roles left after the run: $(roles_left) (waited $(($(date +%s) - t0)) s for its revocations)"

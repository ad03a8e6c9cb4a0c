#!/usr/bin/env bash
# Issuance benchmark, jitbroker side by side with OpenBao, all on 127.0.0.1 free ports in a temp
# dir, one server at a time, the same N agents, k and duration for each:
#   1. a release `jitbroker dev` (durable: every reply waits for the group-commit flush): the task
#      flow, then the no-op floor (grpc health over the same kind of mTLS channel);
#   2. OpenBao `server -dev -dev-tls` (in-memory storage): the same flow over cert auth and child
#      tokens, then its floor (GET /v1/sys/health);
#   3. OpenBao with single-node raft storage (durable: fsync per commit), TLS from a CA made for
#      the run, initialised and unsealed over its API: the flow.
# Then it prints a markdown table of each figure with the ratio jitbroker/OpenBao, and writes it
# to target/bench/side-by-side.md. The raw reports stay next to it.
#
#   scripts/bench.sh [AGENTS] [K] [SECONDS]
#   JB_BENCH_OPENBAO=0   jitbroker only (no OpenBao build or run)
#   JB_BENCH_RAFT=0      skip the durable OpenBao run
#
# The OpenBao binary comes from scripts/openbao.sh (cached; built or fetched on first use). Only
# this script builds or runs it: CI does not. Needs curl, openssl, python3.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
agents=${1:-8}; k=${2:-4}; secs=${3:-20}
floor_secs=$((secs / 2 > 0 ? secs / 2 : 1))
with_bao=${JB_BENCH_OPENBAO:-1}
with_raft=${JB_BENCH_RAFT:-1}
cd "$root"
cargo build --release --locked --bin jitbroker --bin jitbroker-load >/dev/null
load=target/release/jitbroker-load
bao=
[[ $with_bao == 1 ]] && bao=$(scripts/openbao.sh install)
out=target/bench
mkdir -p "$out"
rm -f "$out"/*.txt
work=$(mktemp -d)
pid=
stop() { jb_stop; } # ports.sh
trap 'stop; rm -rf "$work"' EXIT
# shellcheck source=ports.sh
source "$root/scripts/ports.sh"
run() { # NAME ARGS...: one load-generator run, report to $out/NAME.txt and stdout
	local name=$1
	shift
	"$load" --agents "$agents" --k "$k" --data-dir "$work/d" "$@" | tee "$out/$name.txt"
}

machine="$(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo); load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== machine: $machine"
echo "== N=$agents agents, k=$k, ${secs}s per flow run, ${floor_secs}s per floor run"

# ---- 1. jitbroker ------------------------------------------------------------------------------
api=$(free_port); ops=$(free_port)
jb_prepare_dev target/release/jitbroker "$work/d"
RUST_LOG=warn target/release/jitbroker dev --data-dir "$work/d" --listen "127.0.0.1:$api" --ops-listen "127.0.0.1:$ops" >"$work/broker.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$ops/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
echo "== jitbroker task flow (StartTask, $k x IssueCredential, Introspect, CompleteTask)"
run jb-flow --addr "127.0.0.1:$api" --seconds "$secs" --pid "$pid"
echo "== jitbroker no-op floor (grpc.health.v1.Health/Check)"
run jb-noop --addr "127.0.0.1:$api" --seconds "$floor_secs" --pid "$pid" --noop
stop

# ---- OpenBao ------------------------------------------------------------------------------------
# bao_wait URL CA: until GET /v1/sys/health answers 200 (initialised, unsealed, active).
bao_wait() {
	for _ in $(seq 1 150); do
		curl -fsS --cacert "$2" "$1/v1/sys/health" >/dev/null 2>&1 && return 0
		sleep 0.2
	done
	echo "OpenBao at $1 not ready" >&2
	return 1
}
# bao_setup URL CA TOKEN: cert auth trusting the dev CA of the jitbroker run, roles `agent`
# (SPIFFE IDs .../agent/*: may create child tokens with policy demo-token) and `tool`
# (.../tool/*: may look tokens up).
bao_setup() {
	local url=$1 ca=$2 token=$3
	c() { curl -fsS --cacert "$ca" -H "X-Vault-Token: $token" -X "$1" "$url/v1/$2" -d "$3" >/dev/null; }
	c POST sys/auth/cert '{"type":"cert"}'
	c PUT sys/policies/acl/agent '{"policy":"path \"auth/token/create\" { capabilities = [\"update\"] }"}'
	c PUT sys/policies/acl/demo-token '{"policy":"path \"secret/demo-token\" { capabilities = [\"read\"] }"}'
	c PUT sys/policies/acl/tool '{"policy":"path \"auth/token/lookup\" { capabilities = [\"update\"] }"}'
	role() {
		python3 -c 'import json,sys; print(json.dumps({"certificate": open(sys.argv[1]).read(),
			"allowed_uri_sans": [sys.argv[2]], "token_policies": sys.argv[3].split(","),
			"token_ttl": sys.argv[4]}))' "$work/d/dev/ca.pem" "$@"
	}
	c POST auth/cert/certs/agent "$(role 'spiffe://jitbroker.dev/agent/*' agent,demo-token 300s)"
	c POST auth/cert/certs/tool "$(role 'spiffe://jitbroker.dev/tool/*' tool 3600s)"
}

if [[ $with_bao == 1 ]]; then
	# ---- 2. OpenBao dev mode (in memory) ----
	port=$(free_pair)
	mkdir -p "$work/bao-dev-tls"
	"$bao" server -dev -dev-tls -dev-tls-cert-dir="$work/bao-dev-tls" -dev-listen-address="127.0.0.1:$port" \
		-dev-root-token-id=root -dev-no-store-token -log-level=warn >"$work/bao-dev.log" 2>&1 &
	pid=$!
	ca=$work/bao-dev-tls/vault-ca.pem
	for _ in $(seq 1 100); do [[ -s $ca ]] && break; sleep 0.1; done
	bao_wait "https://127.0.0.1:$port" "$ca"
	bao_setup "https://127.0.0.1:$port" "$ca" root
	echo "== OpenBao dev (in memory): cert login, $k x child token create, lookup (tool), revoke-self"
	run bao-dev-flow --target openbao --addr "127.0.0.1:$port" --server-ca "$ca" --seconds "$secs" --pid "$pid" --store-dir "$work/none"
	echo "== OpenBao no-op floor (GET /v1/sys/health)"
	run bao-dev-noop --target openbao --addr "127.0.0.1:$port" --server-ca "$ca" --seconds "$floor_secs" --pid "$pid" --noop --store-dir "$work/none"
	stop

	# ---- 3. OpenBao with raft storage (durable) ----
	if [[ $with_raft == 1 ]]; then
		port=$(free_pair)
		t=$work/raft-tls
		mkdir -p "$t" "$work/raft"
		openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$t/ca.key" -out "$t/ca.pem" \
			-days 1 -subj /CN=bench-ca -addext basicConstraints=critical,CA:TRUE \
			-addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
		openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$t/key.pem" -out "$t/req.csr" \
			-subj /CN=localhost 2>/dev/null
		printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n' >"$t/ext"
		openssl x509 -req -in "$t/req.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" -CAcreateserial -out "$t/cert.pem" \
			-days 1 -extfile "$t/ext" 2>/dev/null
		cat >"$work/raft.hcl" <<EOF
ui = false
disable_mlock = true
log_level = "warn"
api_addr = "https://127.0.0.1:$port"
cluster_addr = "https://127.0.0.1:$((port + 1))"
storage "raft" {
  path    = "$work/raft"
  node_id = "bench"
}
listener "tcp" {
  address         = "127.0.0.1:$port"
  cluster_address = "127.0.0.1:$((port + 1))"
  tls_cert_file   = "$t/cert.pem"
  tls_key_file    = "$t/key.pem"
}
EOF
		"$bao" server -config="$work/raft.hcl" >"$work/bao-raft.log" 2>&1 &
		pid=$!
		url=https://127.0.0.1:$port
		for _ in $(seq 1 100); do curl -sS --cacert "$t/ca.pem" "$url/v1/sys/seal-status" >/dev/null 2>&1 && break; sleep 0.1; done
		init=$(curl -fsS --cacert "$t/ca.pem" -X PUT "$url/v1/sys/init" -d '{"secret_shares":1,"secret_threshold":1}')
		key=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["keys_base64"][0])' "$init")
		token=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["root_token"])' "$init")
		curl -fsS --cacert "$t/ca.pem" -X PUT "$url/v1/sys/unseal" -d "{\"key\":\"$key\"}" >/dev/null
		bao_wait "$url" "$t/ca.pem"
		bao_setup "$url" "$t/ca.pem" "$token"
		echo "== OpenBao raft (durable): cert login, $k x child token create, lookup (tool), revoke-self"
		run bao-raft-flow --target openbao --addr "127.0.0.1:$port" --server-ca "$t/ca.pem" --seconds "$secs" --pid "$pid" --store-dir "$work/raft"
		stop
	fi
fi

# ---- table --------------------------------------------------------------------------------------
bao_version=
[[ -n $bao ]] && bao_version=$("$bao" version | head -1)
python3 scripts/bench_table.py "$out" "$agents" "$k" "$secs" "$floor_secs" "$bao_version" "$machine" | tee "$out/side-by-side.md"

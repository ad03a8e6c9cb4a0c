#!/usr/bin/env bash
# The cost of deciding tool calls at the gateway (BENCHMARKS.md, "Tool calls through a gateway").
#
#   scripts/bench-gateway.sh [AGENTS] [SECONDS] [RATE]
#
# Starts a dev broker with a gateway route, a trivial tool upstream, and two real Envoys from the
# configuration in docs/gateways.md: one with the ext_authz filter and one without it. Then:
#   1. HTTP calls through Envoy without the filter, paced at RATE/s (the baseline hop);
#   2. the same through Envoy with the filter (each call decided by the broker, the credential
#      injected): the difference is the added latency of the authorization hop;
#   3. Authorization/Check called directly over gRPC, as fast as answered and paced at RATE/s;
# and counts the credentials the broker minted for all those calls (reuse under one task).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
agents=${1:-8}; secs=${2:-10}; rate=${3:-500}
cd "$root"
cargo build --release --locked --bin jitbroker --bin jitbroker-gateway-load >/dev/null
jb=target/release/jitbroker
load=target/release/jitbroker-gateway-load
envoy=$(scripts/tools.sh path envoy)
source scripts/ports.sh
work=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

api=$(free_port); ops=$(free_port)
start_broker() {
	RUST_LOG=warn "$jb" dev --data-dir "$work/d" --listen "127.0.0.1:$api" --ops-listen "127.0.0.1:$ops" >>"$work/broker.log" 2>&1 &
	broker=$!
	pids+=("$broker")
	jb_ready "http://127.0.0.1:$ops/readyz" ready
}
# First start creates the dev directory; then add the gateway and start again.
start_broker
kill "$broker"; wait "$broker" 2>/dev/null || true
jb_prepare_dev "$jb" "$work/d"
cat >>"$work/d/jitbroker.toml" <<'EOF'

[resources.tickets]
kind = "token"
actions = ["read"]
[resources.tickets.inject]

[gateway]
ids = ["spiffe://jitbroker.dev/gateway/bench"]

[[gateway.routes]]
name = "tickets-read"
path_prefix = "/tickets"
methods = ["GET"]
resource = "tickets"
action = "read"
EOF
cat >>"$work/d/policy.cedar" <<'EOF'

@id("bench-agents-read-tickets")
permit(principal, action == Action::"read", resource == Resource::"tickets")
when { principal.spiffe_id like "spiffe://jitbroker.dev/agent/*" };
EOF
start_broker

tool=$(free_port)
"$load" tool --listen "127.0.0.1:$tool" &
pids+=($!)
"$load" gateway-svid --data-dir "$work/d" --out "$work/svid"

# Two Envoys from the documented configuration: with and without the ext_authz filter.
envoy_cfg() { # OUT LISTEN ADMIN WITH_FILTER
	python3 - "$root/docs/gateways.md" "$@" "$api" "$tool" "$work/svid" <<'PY'
import re, sys
page, out, listen, admin, with_filter, api, tool, svid = sys.argv[1:]
text = open(page).read()
yaml = text.split("<!-- envoy-config -->\n```yaml\n", 1)[1].split("```", 1)[0]
for a, b in [
    ("address: 127.0.0.1, port_value: 9901", f"address: 127.0.0.1, port_value: {admin}"),
    ("address: 0.0.0.0, port_value: 10443", f"address: 127.0.0.1, port_value: {listen}"),
    ("address: jitbroker.jitbroker.svc.cluster.local, port_value: 8443", f"address: 127.0.0.1, port_value: {api}"),
    ("address: tickets.tools.svc.cluster.local, port_value: 8080", f"address: 127.0.0.1, port_value: {tool}"),
    ("/etc/envoy/svid/", svid + "/"),
    ("spiffe://example.org/ns/agents/", "spiffe://jitbroker.dev/agent/"),
    ("spiffe://example.org/ns/jitbroker/sa/jitbroker", "spiffe://jitbroker.dev/jitbroker"),
]:
    assert a in yaml, a
    yaml = yaml.replace(a, b)
if with_filter != "1":
    yaml = re.sub(r"\n          - name: envoy\.filters\.http\.ext_authz\n.*?(?=\n          - name: envoy\.filters\.http\.router)", "", yaml, flags=re.S)
    assert "ext_authz" not in yaml.split("http_filters:")[1].split("clusters:")[0]
open(out, "w").write(yaml)
PY
}
start_envoy() { # NAME WITH_FILTER -> sets listen
	local name=$1 admin
	listen=$(free_port); admin=$(free_port)
	envoy_cfg "$work/$name.yaml" "$listen" "$admin" "$2"
	"$envoy" --config-path "$work/$name.yaml" --disable-hot-restart --concurrency 1 --log-level warn \
		--log-path "$work/$name.log" --base-id "$admin" &
	pids+=($!)
	jb_ready "http://127.0.0.1:$admin/ready" LIVE
}
start_envoy plain 0; plain=$listen
start_envoy authz 1; authz=$listen

issued() { curl -fsS "http://127.0.0.1:$ops/metrics" | awk '/^jitbroker_credentials_issued_total\{kind="token"\}/{print $2}'; }
calls() { curl -fsS "http://127.0.0.1:$ops/metrics" | awk '/^jitbroker_tool_calls_total\{decision="allowed"\}/{print $2}'; }

echo "== machine: $(nproc) cores, load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== $agents agents, ${secs}s per run, paced runs at $rate calls/s"
echo "-- Envoy without ext_authz (baseline hop)"
"$load" http --addr "127.0.0.1:$plain" --data-dir "$work/d" --agents "$agents" --seconds "$secs" --rate "$rate"
echo "-- Envoy with ext_authz to jitbroker (decision + credential injection)"
"$load" http --addr "127.0.0.1:$authz" --broker "127.0.0.1:$api" --data-dir "$work/d" --agents "$agents" --seconds "$secs" --rate "$rate"
echo "-- Authorization/Check direct over gRPC, paced"
"$load" check --addr "127.0.0.1:$api" --data-dir "$work/d" --agents "$agents" --seconds "$secs" --rate "$rate"
echo "-- Authorization/Check direct over gRPC, as fast as answered"
"$load" check --addr "127.0.0.1:$api" --data-dir "$work/d" --agents "$agents" --seconds "$secs"
echo "-- Envoy with ext_authz, as fast as answered"
"$load" http --addr "127.0.0.1:$authz" --broker "127.0.0.1:$api" --data-dir "$work/d" --agents "$agents" --seconds "$secs"
echo "== credentials minted: $(issued) for $(calls) allowed tool calls (one task per agent per run)"

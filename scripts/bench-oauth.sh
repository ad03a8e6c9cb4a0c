#!/usr/bin/env bash
# The cost of the OAuth surface and of forward auth (BENCHMARKS.md, "OAuth and forward auth").
#
#   scripts/bench-oauth.sh [AGENTS] [SECONDS] [RATE]
#
# Starts a dev broker with the OAuth listener (docs/oauth.md) and the forward-auth listener, a
# trivial tool upstream, and two real nginx from the configuration in docs/gateways.md: one with
# `auth_request` to the broker and one without it. Then, in one run:
#   1. the gRPC task flow (jitbroker-load, k = 4) for the figures next to which the OAuth ones stand;
#   2. the token endpoint (jwt-bearer with a JWT-SVID; one token in 16 starts a new task), as fast
#      as answered and paced at RATE/s;
#   3. introspection by the resource's verifier, as fast as answered and paced at RATE/s;
#   4. HTTP calls through nginx without and with forward auth, paced at RATE/s: the difference is
#      the latency forward auth adds.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
agents=${1:-8}; secs=${2:-10}; rate=${3:-400}
cd "$root"
cargo build --release --locked --bin jitbroker --bin jitbroker-gateway-load --bin jitbroker-load >/dev/null
jb=target/release/jitbroker
load=target/release/jitbroker-gateway-load
grpc_load=target/release/jitbroker-load
nginx=${JITBROKER_NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
[[ -x $nginx ]] || { echo "nginx is needed (apt-get install nginx-light)" >&2; exit 1; }
source scripts/ports.sh
work=$(mktemp -d)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

api=$(free_port); ops=$(free_port); oauth=$(free_port); fa=$(free_port)
jb_prepare_dev "$jb" "$work/d"
sed -i 's/^# jwt_audience = "jitbroker"/jwt_audience = "jitbroker"/' "$work/d/jitbroker.toml"
# Agents keep their tasks open (16 tokens each, tasks left to expire) and the gRPC flow's tasks
# hold their credentials: neither quota is what is measured.
sed -i 's/^max_ttl_seconds = .*/max_ttl_seconds = 3600\nmax_credentials_per_task = 100000\nmax_active_tasks_per_identity = 100000/' "$work/d/jitbroker.toml"
cat >>"$work/d/jitbroker.toml" <<EOF

[oauth]
listen = "127.0.0.1:$oauth"
issuer = "https://127.0.0.1:$oauth"

[resources.tickets-mcp]
kind = "jwt"
actions = ["tickets:read"]
verifiers = ["spiffe://jitbroker.dev/tool/demo"]
oauth_resource = "https://tickets.internal/mcp"

[resources.tickets]
kind = "token"
actions = ["read"]
[resources.tickets.inject]

[gateway]
ids = ["spiffe://jitbroker.dev/gateway/bench"]
forward_auth_listen = "127.0.0.1:$fa"

[[gateway.routes]]
name = "tickets-read"
path_prefix = "/tickets"
methods = ["GET"]
resource = "tickets"
action = "read"
EOF
cat >>"$work/d/policy.cedar" <<'EOF'

@id("bench-agents-tickets")
permit(principal, action in [Action::"read", Action::"tickets:read"], resource)
when { principal.spiffe_id like "spiffe://jitbroker.dev/agent/*" &&
       (resource == Resource::"tickets" || resource == Resource::"tickets-mcp") };
EOF
RUST_LOG=warn "$jb" dev --data-dir "$work/d" --listen "127.0.0.1:$api" --ops-listen "127.0.0.1:$ops" >>"$work/broker.log" 2>&1 &
pids+=($!)
jb_ready "http://127.0.0.1:$ops/readyz" ready

tool=$(free_port)
"$load" tool --listen "127.0.0.1:$tool" &
pids+=($!)
"$load" gateway-svid --data-dir "$work/d" --out "$work/svid"

# Two nginx from the documented configuration: with and without auth_request.
nginx_cfg() { # DIR LISTEN WITH_AUTH
	mkdir -p "$1"
	python3 - "$root/docs/gateways.md" "$@" "$fa" "$tool" "$work/svid" <<'PY'
import os, re, sys
page, d, listen, with_auth, fa, tool, svid = sys.argv[1:]
text = open(page).read()
server = text.split("<!-- nginx-config -->\n```nginx\n", 1)[1].split("```", 1)[0]
for a, b in [
    ("listen 443 ssl;", f"listen 127.0.0.1:{listen} ssl;"),
    ("server jitbroker.jitbroker.svc.cluster.local:8444;", f"server 127.0.0.1:{fa};"),
    ("http://tickets.tools.svc.cluster.local:8080", f"http://127.0.0.1:{tool}"),
    ("proxy_ssl_name jitbroker.jitbroker.svc.cluster.local;", "proxy_ssl_name localhost;"),
    ("/etc/nginx/svid/", svid + "/"),
]:
    assert a in server, a
    server = server.replace(a, b)
if with_auth != "1":
    server = re.sub(r"\n        auth_request /_jitbroker;", "", server)
    assert "auth_request /_jitbroker;" not in server
user = "user root;\n" if os.geteuid() == 0 else ""
open(os.path.join(d, "nginx.conf"), "w").write(
    f"{user}worker_processes 1;\nerror_log {d}/error.log warn;\npid {d}/nginx.pid;\n"
    "events { worker_connections 1024; }\n"
    f"http {{\n  access_log off;\n  client_body_temp_path {d}/t1;\n  proxy_temp_path {d}/t2;\n"
    f"  fastcgi_temp_path {d}/t3;\n  uwsgi_temp_path {d}/t4;\n  scgi_temp_path {d}/t5;\n"
    f"{server}\n}}\n"
)
PY
}
start_nginx() { # NAME WITH_AUTH -> sets listen
	listen=$(free_port)
	nginx_cfg "$work/$1" "$listen" "$2"
	"$nginx" -p "$work/$1" -c "$work/$1/nginx.conf" -g 'daemon off;' &
	pids+=($!)
	for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$listen") 2>/dev/null && return 0; sleep 0.05; done
	echo "nginx $1 did not start" >&2; return 1
}
start_nginx plain 0; plain=$listen
start_nginx authed 1; authed=$listen

echo "== machine: $(nproc) cores, load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== $agents agents, ${secs}s per run, paced runs at $rate calls/s"
echo "-- gRPC task flow (StartTask, 4 x IssueCredential, Introspect, CompleteTask)"
"$grpc_load" --addr "127.0.0.1:$api" --data-dir "$work/d" --agents "$agents" --k 4 --seconds "$secs"
o=(--addr "127.0.0.1:$oauth" --resource https://tickets.internal/mcp --data-dir "$work/d" --agents "$agents" --seconds "$secs")
echo "-- OAuth token endpoint (jwt-bearer, JWT access token), as fast as answered"
"$load" oauth-token "${o[@]}"
echo "-- OAuth token endpoint, paced"
"$load" oauth-token "${o[@]}" --rate "$rate"
echo "-- OAuth introspection (verifier over mTLS), as fast as answered"
"$load" oauth-introspect "${o[@]}"
echo "-- OAuth introspection, paced"
"$load" oauth-introspect "${o[@]}" --rate "$rate"
echo "-- nginx without auth_request (baseline hop), paced"
"$load" http --addr "127.0.0.1:$plain" --data-dir "$work/d" --agents "$agents" --seconds "$secs" --rate "$rate"
echo "-- nginx with auth_request to jitbroker's forward auth, paced"
"$load" http --addr "127.0.0.1:$authed" --broker "127.0.0.1:$api" --data-dir "$work/d" --agents "$agents" --seconds "$secs" --rate "$rate"

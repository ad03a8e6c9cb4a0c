#!/usr/bin/env bash
# Issuance benchmark: starts a release `jitbroker dev` (durable mode: every reply waits for the
# flush) on free ports in a temp dir, then runs the load generator for the task flow and for the
# no-op floor (grpc health over the same kind of mTLS channel). Prints both reports.
#   scripts/bench.sh [AGENTS] [K] [SECONDS]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
agents=${1:-8}; k=${2:-4}; secs=${3:-20}
cd "$root"
cargo build --release --locked --bin jitbroker --bin jitbroker-load >/dev/null
work=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
api=$(free_port); ops=$(free_port)
RUST_LOG=warn target/release/jitbroker dev --data-dir "$work/d" --listen "127.0.0.1:$api" --ops-listen "127.0.0.1:$ops" >"$work/broker.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$ops/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB"
echo "== task flow (StartTask, $k x IssueCredential, Introspect, CompleteTask)"
target/release/jitbroker-load --addr "127.0.0.1:$api" --data-dir "$work/d" --agents "$agents" --k "$k" --seconds "$secs" --pid "$pid"
echo "== no-op floor (grpc.health.v1.Health/Check)"
target/release/jitbroker-load --addr "127.0.0.1:$api" --data-dir "$work/d" --agents "$agents" --seconds "$((secs / 2 > 0 ? secs / 2 : 1))" --pid "$pid" --noop

#!/usr/bin/env bash
# Runs the README's newcomer path exactly as written: `cargo run --release -- dev` in the checkout,
# then every shell block marked <!-- walkthrough --> in order, with the real grpcurl. Fails if any
# step fails or the output is not what the README says it is.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck source=tools.sh
source scripts/tools.sh
jb_tools_install grpcurl >/dev/null
export PATH="$(jb_tools_bin_dir):$PATH"

for port in 8443 9090; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "smoke-readme: port $port is in use; the README's example needs it free" >&2
    exit 1
  fi
done

run_cmd=$(awk '/^## Run it/{f=1} f && /^```sh/{getline; print; exit}' README.md)
[ "$run_cmd" = "cargo run --release -- dev" ] || { echo "smoke-readme: README run command changed: $run_cmd" >&2; exit 1; }

log=$(mktemp)
$run_cmd >"$log" 2>&1 &
server=$!
cleanup() { kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -f "$log"; }
trap cleanup EXIT

for _ in $(seq 1 600); do
  if curl -fsS http://127.0.0.1:9090/readyz >/dev/null 2>&1; then break; fi
  if ! kill -0 "$server" 2>/dev/null; then echo "smoke-readme: the broker exited:" >&2; cat "$log" >&2; exit 1; fi
  sleep 0.5
done
curl -fsS http://127.0.0.1:9090/readyz >/dev/null

script=$(awk '/<!-- walkthrough -->/{w=1; next} w && /^```sh/{b=1; next} b && /^```/{b=0; w=0; next} b{print}' README.md)
[ -n "$script" ] || { echo "smoke-readme: no walkthrough blocks found in README.md" >&2; exit 1; }
out=$(bash -euo pipefail -c "$script" 2>&1) || { echo "$out" >&2; echo "smoke-readme: walkthrough failed" >&2; exit 1; }
echo "$out"

expect() { grep -q -- "$1" <<<"$out" || { echo "smoke-readme: expected '$1' in the walkthrough output" >&2; exit 1; }; }
expect 'jitbroker.v1.Broker'
expect '"decision": "ALLOWED"'
expect '"secret": "jbt_'
expect '"active": true'
expect '"revokedCredentialIds"'
# The last introspection (after completion) prints an empty message: inactive.
[ "$(tail -n 1 <<<"$out")" = "{}" ] || { echo "smoke-readme: credential still active after CompleteTask" >&2; exit 1; }
grep -q "DEV MODE" "$log" || { echo "smoke-readme: dev banner missing" >&2; exit 1; }
kill -TERM "$server"
wait "$server" || { echo "smoke-readme: broker did not exit cleanly" >&2; cat "$log" >&2; exit 1; }
trap - EXIT
rm -f "$log"
echo "smoke-readme: README walkthrough passed"

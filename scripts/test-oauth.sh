#!/usr/bin/env bash
# The OAuth 2 authorization-server conformance suite (tests/oauth, docs/oauth.md): independent
# clients (authlib, PyJWT, requests, httpx, the MCP Python SDK) against a real `jitbroker dev`
# with [oauth] on. Installs what it needs into a venv under ~/.cache/jitbroker (cached, from
# PyPI), lints and type-checks the suite, then runs it against JITBROKER_BIN (default
# target/release/jitbroker).
#
#   scripts/test-oauth.sh [PYTEST ARGS...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
suite="$root/tests/oauth"
# shellcheck source=python-env.sh
source scripts/python-env.sh

step "OAuth conformance venv (cached in $cache/python-oauth)"
venv "$cache/python-oauth" "$suite/requirements.txt"
bin="$cache/python-oauth/bin"
# The jitbroker SDK only starts the dev broker and starts/completes tasks over gRPC; the OAuth
# traffic goes through the independent clients above.
"$bin/pip" install -q --no-deps --force-reinstall "$root/sdk/python"

step "ruff and mypy --strict (tests/oauth)"
(cd "$suite" && "$bin/ruff" check .)
(cd "$suite" && "$bin/mypy" --strict --config-file pyproject.toml)

step "pytest (against $JITBROKER_BIN)"
if [ ! -x "$JITBROKER_BIN" ]; then
  echo "no broker binary at $JITBROKER_BIN (build it: cargo build --release)" >&2
  exit 1
fi
(cd "$suite" && "$bin/python" -m pytest -q -p no:cacheprovider --timeout 60 -c pyproject.toml \
  --rootdir "$suite" "$@" "$suite")

echo
echo "scripts/test-oauth.sh: the OAuth conformance suite passed"

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
cache="${XDG_CACHE_HOME:-$HOME/.cache}/jitbroker"
export JITBROKER_BIN="${JITBROKER_BIN:-$root/target/release/jitbroker}"
# A relative path means one from where the script was called; the suites run elsewhere.
case $JITBROKER_BIN in /*) ;; *) JITBROKER_BIN="$(cd "$OLDPWD" 2>/dev/null && pwd)/$JITBROKER_BIN" ;; esac

step() { printf '\n==> %s\n' "$*"; }

# venv DIR REQUIREMENTS: a venv whose packages are exactly REQUIREMENTS, rebuilt when it changes.
venv() {
  local dir=$1 req=$2 stamp
  stamp=$(sha256sum "$req" | cut -c1-16)
  if [ ! -x "$dir/bin/python" ] || [ "$(cat "$dir/.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip >/dev/null
    "$dir/bin/pip" install -q -r "$req"
    echo "$stamp" >"$dir/.stamp"
  fi
}

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

#!/usr/bin/env bash
# The Python SDK's checks: installs what they need into venvs under ~/.cache/jitbroker (cached,
# from PyPI), checks that the committed gRPC stubs match proto/, lints and type-checks the
# package, then runs its pytest suite (against the real broker: JITBROKER_BIN, default
# target/release/jitbroker), the README quick starts, the example agent and the benchmark smoke.
#
#   scripts/test-python.sh            everything
#   scripts/test-python.sh --regen    regenerate sdk/python/src/jitbroker/v1 from proto/ and exit
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
sdk="$root/sdk/python"
# shellcheck source=python-env.sh
source scripts/python-env.sh

# gen OUT: the stubs of proto/jitbroker/v1 into OUT/jitbroker/v1.
gen() {
  local out=$1
  mkdir -p "$out"
  PATH="$cache/python-codegen/bin:$PATH" "$cache/python-codegen/bin/python" -m grpc_tools.protoc \
    -I proto --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" \
    --mypy_grpc_out="$out" proto/jitbroker/v1/*.proto >"$out/.protoc.log" 2>&1 ||
    { cat "$out/.protoc.log" >&2; return 1; }
  rm -f "$out/.protoc.log"
}

step "Python venvs (cached in $cache)"
venv "$cache/python-codegen" "$sdk/requirements-codegen.txt"
venv "$cache/python-sdk" "$sdk/requirements-test.txt"
py="$cache/python-sdk/bin/python"

if [ "${1:-}" = "--regen" ]; then
  gen "$sdk/src"
  echo "regenerated $sdk/src/jitbroker/v1"
  exit 0
fi

step "committed stubs match proto/"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
gen "$tmp"
if ! diff -r -x __init__.py -x __pycache__ "$tmp/jitbroker/v1" "$sdk/src/jitbroker/v1"; then
  echo "sdk/python/src/jitbroker/v1 is stale: run scripts/test-python.sh --regen and commit" >&2
  exit 1
fi

step "pip install ./sdk/python (a built wheel, as users get it)"
"$cache/python-sdk/bin/pip" install -q --no-deps --force-reinstall "$sdk"
(cd "$tmp" && "$py" -c 'import jitbroker, jitbroker.v1.broker_pb2_grpc, importlib.resources as r
assert r.files("jitbroker").joinpath("py.typed").is_file(), "py.typed missing from the wheel"
print("installed jitbroker", jitbroker.__version__, "from", jitbroker.__file__)')

step "ruff and mypy"
(cd "$sdk" && "$cache/python-sdk/bin/ruff" check src tests bench ../../examples)
(cd "$sdk" && "$cache/python-sdk/bin/mypy" --config-file pyproject.toml)

step "pytest (against $JITBROKER_BIN)"
if [ ! -x "$JITBROKER_BIN" ]; then
  echo "no broker binary at $JITBROKER_BIN (build it: cargo build --release)" >&2
  exit 1
fi
# The suite imports the installed wheel, not the source tree, so it tests what users install.
(cd "$sdk/tests" && "$py" -m pytest -q -p no:cacheprovider --timeout 120 -c "$sdk/pyproject.toml" \
  --rootdir "$sdk" "$sdk/tests")

step "SDK benchmark smoke (no figures asserted; figures: BENCHMARKS.md)"
(cd "$tmp" && "$py" "$sdk/bench/bench_sdk.py" 20 | tail -3)

echo
echo "scripts/test-python.sh: all Python checks passed"

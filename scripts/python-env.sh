# Shared by scripts/test-python.sh and scripts/test-oauth.sh (sourced after `cd "$root"`): the
# venv cache, the broker binary the suites run against, and the helpers.
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

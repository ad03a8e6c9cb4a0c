# Shared settings of the runbook scripts; each procedure in docs/runbook.md has a script here.
# Override with the environment:
#   JB_ADDR        broker API address as the server certificate names it (default localhost:8443)
#   JB_OPS         ops address (default 127.0.0.1:9090)
#   JB_SVIDS       directory with one sub-directory of svid.pem/svid.key/bundle.pem per identity
#                  (default jitbroker-dev/dev/svids: operator, agent, tool, approver)
#   JB_CONFIG      broker config file, for the offline procedures (default jitbroker-dev/jitbroker.toml)
#   JITBROKER      the jitbroker binary (default: jitbroker on PATH, else target/release/jitbroker)
set -euo pipefail
JB_ADDR=${JB_ADDR:-localhost:8443}
JB_OPS=${JB_OPS:-127.0.0.1:9090}
JB_SVIDS=${JB_SVIDS:-jitbroker-dev/dev/svids}
JB_CONFIG=${JB_CONFIG:-jitbroker-dev/jitbroker.toml}
if [ -z "${JITBROKER:-}" ]; then
  JITBROKER=$(command -v jitbroker || echo target/release/jitbroker)
fi

# as IDENTITY grpcurl-args…: grpcurl with the SVID of one identity (mTLS, server verified).
as() {
  local who=$1; shift
  local d="$JB_SVIDS/$who"
  for f in svid.pem svid.key bundle.pem; do
    [ -r "$d/$f" ] || { echo "runbook: no $d/$f; mint it with: jitbroker dev-svid or your SPIRE" >&2; return 1; }
  done
  grpcurl -cacert "$d/bundle.pem" -cert "$d/svid.pem" -key "$d/svid.key" "$@"
}

# field NAME: read a top-level string field from grpcurl's JSON on stdin.
field() { sed -n "s/.*\"$1\": \"\\([^\"]*\\)\".*/\\1/p" | head -n 1; }

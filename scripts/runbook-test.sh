#!/usr/bin/env bash
# Runs every procedure of docs/runbook.md (the scripts under scripts/runbook/) against a live
# `jitbroker dev` with the real grpcurl over mTLS, and checks what each is documented to show.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=tools.sh
source "$root/scripts/tools.sh"
jb_tools_install grpcurl >/dev/null
export PATH="$(jb_tools_bin_dir):$PATH"
export JITBROKER=${JITBROKER:-$root/target/release/jitbroker}
[ -x "$JITBROKER" ] || { echo "runbook-test: build first (cargo build --release)" >&2; exit 1; }
rb="$root/scripts/runbook"

work=$(mktemp -d)
cd "$work"
# shellcheck source=ports.sh
source "$root/scripts/ports.sh"
api=$(free_port); ops=$(free_port)
export JB_ADDR="localhost:$api" JB_OPS="127.0.0.1:$ops" JB_SVIDS="jitbroker-dev/dev/svids" JB_CONFIG="jitbroker-dev/jitbroker.toml"

mkdir -p jitbroker-dev
cat > jitbroker-dev/policy.cedar <<'POLICY'
@id("agents-read")
permit(principal, action == Action::"read", resource)
when { principal.path like "/agent/*" && (resource == Resource::"demo-token" || resource == Resource::"demo-jwt") };

@id("jwt-writes-need-approval")
@approval("required")
permit(principal, action == Action::"write", resource == Resource::"demo-jwt")
when { principal.path like "/agent/*" };
POLICY

server=""
start() {
  "$JITBROKER" dev --data-dir jitbroker-dev --listen "127.0.0.1:$api" --ops-listen "127.0.0.1:$ops" >>broker.log 2>&1 &
  server=$!
  for _ in $(seq 1 200); do
    curl -fsS "http://$JB_OPS/readyz" >/dev/null 2>&1 && return 0
    kill -0 "$server" 2>/dev/null || { cat broker.log >&2; return 1; }
    sleep 0.1
  done
  echo "runbook-test: broker not ready" >&2; cat broker.log >&2; return 1
}
stop() { kill -TERM "$server"; wait "$server"; server=""; }
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; cd /; rm -rf "$work"; }
trap cleanup EXIT

pass=0
check() { # check NAME PATTERN OUTPUT
  if grep -q -- "$2" <<<"$3"; then pass=$((pass + 1)); echo "ok   $1"; else echo "FAIL $1: expected '$2' in:" >&2; echo "$3" >&2; exit 1; fi
}
source "$rb/lib.sh"

start
check preflight '"status": "SERVING"' "$("$rb/preflight.sh")"
check status '"policyCount": 2' "$("$rb/status.sh")"
check revocation-debt 'revocation debt: 0 pending, oldest 0 s' "$("$rb/revocation-debt.sh")"

task=$(as agent -d '{"purpose":"update customer record","grants":[{"resource":"demo-token","action":"read"},{"resource":"demo-jwt","action":"write"}],"ttl_seconds":600}' "$JB_ADDR" jitbroker.v1.Broker/StartTask)
check start-needs-approval '"decision": "NEEDS_APPROVAL"' "$task"
task_id=$(field taskId <<<"$task")
secret=$(as agent -d "{\"task_id\":\"$task_id\",\"resource\":\"demo-token\",\"action\":\"read\"}" "$JB_ADDR" jitbroker.v1.Broker/IssueCredential | field secret)
check agent-tasks "$task_id" "$("$rb/agent-tasks.sh" spiffe://jitbroker.dev/agent/demo ACTIVE)"

pending=$("$rb/approvals.sh" list)
check approvals-list '"state": "PENDING"' "$pending"
approval=$(field approvalId <<<"$pending")
check approve '"state": "APPROVED"' "$("$rb/approvals.sh" approve "$approval" "change ticket 99")"
check approved-issue '"kind": "jwt"' "$(as agent -d "{\"task_id\":\"$task_id\",\"resource\":\"demo-jwt\",\"action\":\"write\"}" "$JB_ADDR" jitbroker.v1.Broker/IssueCredential)"
again=$(as agent -d "{\"task_id\":\"$task_id\",\"resource\":\"demo-jwt\",\"action\":\"write\"}" "$JB_ADDR" jitbroker.v1.Broker/IssueCredential 2>&1 || true)
check approval-single-use 'FailedPrecondition' "$again"
check deny '"state": "DENIED"' "$("$rb/approvals.sh" deny "$(sed -n 's/.*approval_id=\(apr_[0-9a-f]*\).*/\1/p' <<<"$again")" "not today")"

metrics=$(curl -fsS "http://$JB_OPS/metrics")
check metrics-issued 'jitbroker_credentials_issued_total{kind="token"} 1' "$metrics"
check metrics-jwt 'jitbroker_credentials_issued_total{kind="jwt"} 1' "$metrics"

check credential-active '"active": true' "$("$rb/check-credential.sh" "$secret" demo-token)"
check compromised-agent 'blocked until' "$("$rb/compromised-agent.sh" spiffe://jitbroker.dev/agent/demo "stolen laptop")"
check credential-dead '^{}$' "$("$rb/check-credential.sh" "$secret" demo-token)"
blocked=$(as agent -d '{"purpose":"x","grants":[{"resource":"demo-token","action":"read"}]}' "$JB_ADDR" jitbroker.v1.Broker/StartTask 2>&1 || true)
check agent-blocked 'PermissionDenied' "$blocked"
metrics=$(curl -fsS "http://$JB_OPS/metrics")
check metrics-revoked 'jitbroker_credentials_ended_total{reason="identity-revoked"} 2' "$metrics"

cat >> jitbroker-dev/policy.cedar <<'POLICY'

@id("agents-write-token")
permit(principal, action == Action::"write", resource == Resource::"demo-token")
when { principal.path like "/agent/*" };
POLICY
check reload-policy '"policyCount": 3' "$("$rb/reload-policy.sh")"
check verify-audit '"ok": true' "$("$rb/verify-audit.sh")"

stop
check backup 'backed up' "$("$rb/backup.sh" jitbroker-dev backup.tar.gz)"
check restore 'audit chain ok' "$("$rb/restore.sh" backup.tar.gz jitbroker-dev)"
check rotate-kek 're-wrapped' "$("$rb/rotate-kek.sh" "$work/kek-2")"
sed -i "s#^kek_file = .*#kek_file = \"$work/kek-2\"#" jitbroker-dev/jitbroker.toml
start
check after-rotation '"ok": true' "$("$rb/verify-audit.sh")"
check after-rotation-status '"policyCount": 3' "$("$rb/status.sh")"
stop
echo "runbook-test: $pass passed, 0 failed"

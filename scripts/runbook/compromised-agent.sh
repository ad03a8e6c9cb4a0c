#!/usr/bin/env bash
# Incident "agent compromised": revoke everything it holds and block it.
#   scripts/runbook/compromised-agent.sh SPIFFE_ID "REASON"
source "$(dirname "$0")/lib.sh"
id=${1:?usage: compromised-agent.sh SPIFFE_ID REASON}
reason=${2:-compromised}
as operator -d "{\"spiffe_id\":\"$id\",\"reason\":\"$reason\",\"block\":true}" "$JB_ADDR" jitbroker.v1.Admin/RevokeIdentity
# Confirm: it has no active task left.
left=$(as operator -d "{\"spiffe_id\":\"$id\",\"state\":\"ACTIVE\"}" "$JB_ADDR" jitbroker.v1.Admin/ListTasks)
if grep -q '"taskId"' <<<"$left"; then echo "runbook: $id still has active tasks:" >&2; echo "$left" >&2; exit 1; fi
echo "$id: no active tasks; blocked until jitbroker.v1.Admin/UnblockIdentity"

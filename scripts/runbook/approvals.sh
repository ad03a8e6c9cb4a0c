#!/usr/bin/env bash
# Approve or deny a pending high-risk request.
#   scripts/runbook/approvals.sh list
#   scripts/runbook/approvals.sh approve APPROVAL_ID "REASON"
#   scripts/runbook/approvals.sh deny APPROVAL_ID "REASON"
source "$(dirname "$0")/lib.sh"
case "${1:-list}" in
  list) as approver -d '{"state":"PENDING"}' "$JB_ADDR" jitbroker.v1.Admin/ListApprovals ;;
  approve) as approver -d "{\"approval_id\":\"${2:?approval id}\",\"reason\":\"${3:-}\"}" "$JB_ADDR" jitbroker.v1.Admin/Approve ;;
  deny) as approver -d "{\"approval_id\":\"${2:?approval id}\",\"reason\":\"${3:-}\"}" "$JB_ADDR" jitbroker.v1.Admin/Deny ;;
  *) echo "usage: approvals.sh list|approve ID REASON|deny ID REASON" >&2; exit 2 ;;
esac

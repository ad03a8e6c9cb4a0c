#!/usr/bin/env bash
# Verify the audit hash chain through the live broker (offline: jitbroker audit verify --config FILE).
source "$(dirname "$0")/lib.sh"
out=$(as operator "$JB_ADDR" jitbroker.v1.Admin/VerifyAudit)
echo "$out"
grep -q '"ok": true' <<<"$out" || { echo "runbook: audit chain does not verify" >&2; exit 1; }

#!/usr/bin/env bash
# Revocation debt: upstream revocations (PostgreSQL roles…) queued and not yet done, and the age of
# the oldest; non-zero exit when anything has waited longer than MAX_AGE seconds (default 60).
source "$(dirname "$0")/lib.sh"
max_age=${1:-60}
m=$(curl -fsS "http://$JB_OPS/metrics")
debt=$(awk '/^jitbroker_revocation_debt /{print $2}' <<<"$m")
age=$(awk '/^jitbroker_revocation_oldest_pending_seconds /{print $2}' <<<"$m")
echo "revocation debt: ${debt:-?} pending, oldest ${age:-?} s"
awk -v a="${age:-0}" -v m="$max_age" 'BEGIN { exit (a > m) ? 1 : 0 }'

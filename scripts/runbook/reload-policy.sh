#!/usr/bin/env bash
# Reload policy after editing the policy file (the broker also reloads on change and on SIGHUP).
# Validates offline first; a set that does not validate is refused and the old one keeps serving.
source "$(dirname "$0")/lib.sh"
"$JITBROKER" policy validate --config "$JB_CONFIG"
as operator "$JB_ADDR" jitbroker.v1.Admin/ReloadPolicy

#!/usr/bin/env bash
# Status: version, identity, live counts, the policy set serving now.
source "$(dirname "$0")/lib.sh"
as operator "$JB_ADDR" jitbroker.v1.Admin/Status

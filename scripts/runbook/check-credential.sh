#!/usr/bin/env bash
# Ask, as a verifier (tool), whether a credential is active: check-credential.sh SECRET RESOURCE
source "$(dirname "$0")/lib.sh"
secret=${1:?usage: check-credential.sh SECRET RESOURCE}
resource=${2:?usage: check-credential.sh SECRET RESOURCE}
as tool -d "{\"secret\":\"$secret\",\"resource\":\"$resource\"}" "$JB_ADDR" jitbroker.v1.Verifier/Introspect

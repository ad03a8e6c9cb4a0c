#!/usr/bin/env bash
# Rotate the KEK (broker stopped): re-wraps the data keys under NEW_KEK_FILE (created if missing).
#   scripts/runbook/rotate-kek.sh NEW_KEK_FILE
# Then set kek_file = NEW_KEK_FILE in the config (or JITBROKER_KEK_FILE), start the broker, and
# retire the old file.
source "$(dirname "$0")/lib.sh"
new=${1:?usage: rotate-kek.sh NEW_KEK_FILE}
"$JITBROKER" kek rotate --config "$JB_CONFIG" --new-kek "$new"

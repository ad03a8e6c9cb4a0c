#!/usr/bin/env bash
# Restore a backup into a data directory (broker stopped), then verify the audit chain offline.
#   scripts/runbook/restore.sh BACKUP.tar.gz DATA_DIR
source "$(dirname "$0")/lib.sh"
in=${1:?usage: restore.sh BACKUP.tar.gz DATA_DIR}
data=${2:?usage: restore.sh BACKUP.tar.gz DATA_DIR}
stamp=$(date +%s)
if [ -d "$data/db" ]; then mv "$data/db" "$data/db.before-restore.$stamp"; fi
if tar -tzf "$in" | grep -q '^audit-archive/' && [ -d "$data/audit-archive" ]; then
	mv "$data/audit-archive" "$data/audit-archive.before-restore.$stamp"
fi
tar -C "$data" -xzf "$in"
"$JITBROKER" audit verify --config "$JB_CONFIG"

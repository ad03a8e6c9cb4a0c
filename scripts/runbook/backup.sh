#!/usr/bin/env bash
# Back up the data directory (broker stopped: the store is single-writer).
#   scripts/runbook/backup.sh DATA_DIR BACKUP.tar.gz
# Secrets inside are sealed; the KEK is not in the backup and must be kept separately.
source "$(dirname "$0")/lib.sh"
data=${1:?usage: backup.sh DATA_DIR BACKUP.tar.gz}
out=${2:?usage: backup.sh DATA_DIR BACKUP.tar.gz}
tar -C "$data" -czf "$out" db
echo "backed up $data/db to $out"

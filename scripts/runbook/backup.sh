#!/usr/bin/env bash
# Back up the data directory (broker stopped: the store is single-writer).
#   scripts/runbook/backup.sh DATA_DIR BACKUP.tar.gz
# Secrets inside are sealed; the KEK is not in the backup and must be kept separately.
source "$(dirname "$0")/lib.sh"
data=${1:?usage: backup.sh DATA_DIR BACKUP.tar.gz}
out=${2:?usage: backup.sh DATA_DIR BACKUP.tar.gz}
# The audit archive (older audit entries, when the default archive_dir is used) belongs with it:
# the chain in the store continues from the archive's last segment.
parts=(db)
if [ -d "$data/audit-archive" ]; then parts+=(audit-archive); fi
tar -C "$data" -czf "$out" "${parts[@]}"
echo "backed up ${parts[*]} of $data to $out"

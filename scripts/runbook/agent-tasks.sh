#!/usr/bin/env bash
# Find an agent's tasks: scripts/runbook/agent-tasks.sh SPIFFE_ID [STATE]
source "$(dirname "$0")/lib.sh"
id=${1:?usage: agent-tasks.sh SPIFFE_ID [ACTIVE|COMPLETED|EXPIRED|REVOKED]}
state=${2:-TASK_STATE_UNSPECIFIED}
as operator -d "{\"spiffe_id\":\"$id\",\"state\":\"$state\",\"page_size\":100}" "$JB_ADDR" jitbroker.v1.Admin/ListTasks

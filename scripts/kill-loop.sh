#!/usr/bin/env bash
# The kill loop: the broker (a real process) under load from two agents with token and PostgreSQL
# credentials, SIGKILLed at a random moment, restarted and checked, KILLS times (100 by default);
# at the end no PostgreSQL role may exist that the ledger does not hold. Needs the PostgreSQL
# server binaries (see tests/common/pg.rs). `cargo test` runs a short version (5 kills).
set -euo pipefail
cd "$(dirname "$0")/.."
export JITBROKER_KILL_LOOP_KILLS="${1:-100}"
export JITBROKER_REQUIRE_POSTGRES=1
cargo test --locked --test postgres kill_loop_under_load_keeps_every_promise -- --nocapture 2>&1 |
  grep -E '^kill loop:|test result|panicked|assert'

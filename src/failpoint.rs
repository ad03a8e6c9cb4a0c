//! Crash points for recovery tests. When `JITBROKER_FAILPOINT` names a point, the process stops
//! there: it prints `FAILPOINT <name> reached` on stderr and parks the thread forever, so that a
//! test can kill it with SIGKILL at exactly that step and restart it. Unset (always, outside
//! tests), `hit` costs one comparison against a value read once.

use std::sync::OnceLock;

fn armed() -> Option<&'static str> {
    static POINT: OnceLock<Option<String>> = OnceLock::new();
    POINT
        .get_or_init(|| {
            std::env::var("JITBROKER_FAILPOINT")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .as_deref()
}

/// Stops the process here (until killed) if `name` is the armed crash point.
pub fn hit(name: &str) {
    if armed() == Some(name) {
        eprintln!("FAILPOINT {name} reached");
        loop {
            std::thread::park();
        }
    }
}

//! Crash points for recovery tests, compiled in only with the `failpoints` cargo feature (never in
//! a release build). When `JITBROKER_FAILPOINT` names a point, the process stops there: it prints
//! `FAILPOINT <name> reached` on stderr and parks the thread forever, so that a test can kill it
//! with SIGKILL at exactly that step and restart it. Without the feature, `hit` is empty and the
//! variable is never read.

/// Stops the process here (until killed) if `name` is the armed crash point.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}

#[cfg(feature = "failpoints")]
fn armed() -> Option<&'static str> {
    use std::sync::OnceLock;
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
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    if armed() == Some(name) {
        eprintln!("FAILPOINT {name} reached");
        loop {
            std::thread::park();
        }
    }
}

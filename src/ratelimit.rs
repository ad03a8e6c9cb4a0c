//! Token buckets by key (a caller's SPIFFE ID, a remote IP address) and per-remote summaries of
//! refused authentications. Both are bounded in memory whatever the keys a client makes up, and
//! both take the time as an argument (milliseconds on any monotonic or injected clock), so tests
//! drive them without sleeping.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

/// Keys tracked at most; past it, keys whose bucket has refilled are forgotten, and if none has,
/// unknown keys share one bucket.
pub const MAX_KEYS: usize = 4096;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
}

/// `per_second` requests per key on average, up to `burst` at once.
#[derive(Debug)]
pub struct RateLimiter<K> {
    per_ms: f64,
    burst: f64,
    buckets: Mutex<(HashMap<K, Bucket>, Option<Bucket>)>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self {
            per_ms: f64::from(per_second) / 1000.0,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new((HashMap::new(), None)),
        }
    }

    fn refill(&self, b: &mut Bucket, now_ms: i64) {
        let elapsed = (now_ms - b.at_ms).max(0) as f64;
        b.tokens = (b.tokens + elapsed * self.per_ms).min(self.burst);
        b.at_ms = now_ms.max(b.at_ms);
    }

    /// Takes one token for `key`: `Ok` when there was one, otherwise the milliseconds until
    /// there will be.
    pub fn check(&self, key: &K, now_ms: i64) -> Result<(), u64> {
        let mut guard = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (map, overflow) = &mut *guard;
        if !map.contains_key(key) && map.len() >= MAX_KEYS {
            map.retain(|_, b| {
                let mut b2 = *b;
                self.refill(&mut b2, now_ms);
                b2.tokens < self.burst
            });
        }
        let fresh = Bucket {
            tokens: self.burst,
            at_ms: now_ms,
        };
        let b = if map.contains_key(key) || map.len() < MAX_KEYS {
            map.entry(key.clone()).or_insert(fresh)
        } else {
            overflow.get_or_insert(fresh)
        };
        self.refill(b, now_ms);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else if self.per_ms > 0.0 {
            // (Less a hair, so that float rounding never adds a millisecond.)
            Err((((1.0 - b.tokens) / self.per_ms) - 1e-6).ceil().max(1.0) as u64)
        } else {
            Err(u64::MAX)
        }
    }
}

/// Refused authentications from one remote address since the last summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailureSummary {
    /// The remote address, or `other` for the addresses past [`MAX_KEYS`].
    pub remote: String,
    pub count: u64,
    /// The first reason seen in the window (a sample: the others are usually the same).
    pub reason: String,
    pub first_ms: i64,
    pub last_ms: i64,
}

/// Counts refused authentications by remote address until [`FailureSummaries::take`] empties
/// it: one summary per address per window instead of one audit entry per attempt.
#[derive(Debug, Default)]
pub struct FailureSummaries {
    map: Mutex<HashMap<String, FailureSummary>>,
}

impl FailureSummaries {
    /// Counts one failure; `true` when it is the first from `remote` in this window (worth one
    /// log line).
    pub fn record(&self, remote: &str, reason: &str, now_ms: i64) -> bool {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let key = if map.contains_key(remote) || map.len() < MAX_KEYS {
            remote
        } else {
            "other"
        };
        match map.get_mut(key) {
            Some(s) => {
                s.count += 1;
                s.last_ms = now_ms;
                false
            }
            None => {
                map.insert(
                    key.to_owned(),
                    FailureSummary {
                        remote: key.to_owned(),
                        count: 1,
                        reason: reason.to_owned(),
                        first_ms: now_ms,
                        last_ms: now_ms,
                    },
                );
                true
            }
        }
    }

    /// The window's summaries (by remote), leaving it empty.
    pub fn take(&self) -> Vec<FailureSummary> {
        let mut v: Vec<FailureSummary> =
            std::mem::take(&mut *self.map.lock().unwrap_or_else(|p| p.into_inner()))
                .into_values()
                .collect();
        v.sort_by(|a, b| a.remote.cmp(&b.remote));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let r = RateLimiter::new(10, 3);
        for _ in 0..3 {
            assert_eq!(r.check(&"a", 0), Ok(()));
        }
        assert_eq!(r.check(&"a", 0), Err(100));
        // Another key has its own bucket.
        assert_eq!(r.check(&"b", 0), Ok(()));
        assert_eq!(r.check(&"a", 99), Err(1));
        assert_eq!(r.check(&"a", 100), Ok(()));
        assert_eq!(r.check(&"a", 100), Err(100));
        // Refilled to the burst, never beyond.
        for _ in 0..3 {
            assert_eq!(r.check(&"a", 10_000), Ok(()));
        }
        assert!(r.check(&"a", 10_000).is_err());
    }

    #[test]
    fn made_up_keys_never_grow_the_map_past_its_bound() {
        let r = RateLimiter::new(1, 1);
        for i in 0..(MAX_KEYS as u64 + 100) {
            let _ = r.check(&i, 0);
        }
        assert_eq!(r.buckets.lock().unwrap().0.len(), MAX_KEYS);
        // Keys past the bound share one bucket, already spent.
        assert!(r.check(&u64::MAX, 0).is_err());
        // Once buckets have refilled, they are forgotten to make room.
        assert_eq!(r.check(&(u64::MAX - 1), 10_000), Ok(()));
        assert!(r.buckets.lock().unwrap().0.len() <= MAX_KEYS);
    }

    #[test]
    fn failures_are_summarised_per_remote_and_bounded() {
        let s = FailureSummaries::default();
        assert!(s.record("10.0.0.1", "no certificate", 5));
        assert!(!s.record("10.0.0.1", "bad certificate", 9));
        assert!(s.record("10.0.0.2", "x", 7));
        let t = s.take();
        assert_eq!(t.len(), 2);
        assert_eq!(
            t[0],
            FailureSummary {
                remote: "10.0.0.1".into(),
                count: 2,
                reason: "no certificate".into(),
                first_ms: 5,
                last_ms: 9,
            }
        );
        assert!(s.take().is_empty());
        for i in 0..(MAX_KEYS + 50) {
            s.record(&format!("r{i}"), "x", 0);
        }
        let t = s.take();
        assert_eq!(t.len(), MAX_KEYS + 1);
        assert_eq!(t.iter().find(|x| x.remote == "other").unwrap().count, 50);
    }
}

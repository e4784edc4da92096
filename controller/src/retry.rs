//! Failed reconcile actions: when each may be tried again (exponential
//! back-off with jitter, capped), why it failed (shown in the instance's
//! state reason), and whether a failure is worth a log line (the first,
//! then one a minute with the count). Sans-IO: the caller passes the time.
//!
//! Leader-local, like host liveness: a new leader starts with none and
//! learns them again at the first try.

use std::collections::HashMap;

/// The first retry waits this long.
pub const BASE_MS: u64 = 200;
/// No retry waits longer.
pub const MAX_MS: u64 = 30_000;
/// A repeated failure is logged at most once per this period.
pub const LOG_EVERY_MS: u64 = 60_000;

/// One action's failures in a row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Failed attempts in a row.
    pub attempts: u32,
    /// Unix ms before which it is not tried again.
    pub next_ms: u64,
    /// The last error.
    pub error: String,
    /// Failures since the last log line.
    pub unlogged: u32,
    /// Unix ms of the last log line.
    pub logged_ms: u64,
}

/// What to log about a failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Log {
    /// Nothing (logged recently).
    Quiet,
    /// The first failure.
    First,
    /// A summary: `n` failures since the last line.
    Again(u32),
}

/// Failed actions by key ([`crate::reconciler::Action::key`]).
#[derive(Clone, Debug, Default)]
pub struct Failures(HashMap<String, Failure>);

/// A jitter factor in [0.75, 1.25) from `key` and `attempts`, the same on
/// every call (deterministic, so tests can predict it).
fn jitter(key: &str, attempts: u32, d: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes().chain(attempts.to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let permille = 750 + h % 500;
    d * permille / 1000
}

impl Failures {
    /// `key` failed with `error` at `now_ms`: when it may run again, and
    /// what to log.
    pub fn failed(&mut self, key: &str, error: String, now_ms: u64) -> Log {
        let f = self.0.entry(key.to_string()).or_insert(Failure {
            attempts: 0,
            next_ms: 0,
            error: String::new(),
            unlogged: 0,
            logged_ms: 0,
        });
        f.attempts += 1;
        let exp = (f.attempts - 1).min(16);
        let delay = BASE_MS.saturating_mul(1 << exp).min(MAX_MS);
        f.next_ms = now_ms + jitter(key, f.attempts, delay);
        f.error = error;
        f.unlogged += 1;
        if f.attempts == 1 {
            f.logged_ms = now_ms;
            f.unlogged = 0;
            Log::First
        } else if now_ms.saturating_sub(f.logged_ms) >= LOG_EVERY_MS {
            let n = f.unlogged;
            f.logged_ms = now_ms;
            f.unlogged = 0;
            Log::Again(n)
        } else {
            Log::Quiet
        }
    }

    /// `key` succeeded: forget its failures.
    pub fn succeeded(&mut self, key: &str) -> Option<Failure> {
        self.0.remove(key)
    }

    /// Whether `key` waits out its back-off at `now_ms`.
    pub fn waiting(&self, key: &str, now_ms: u64) -> bool {
        self.0.get(key).is_some_and(|f| now_ms < f.next_ms)
    }

    /// The failures of `key`, if it is failing.
    pub fn get(&self, key: &str) -> Option<&Failure> {
        self.0.get(key)
    }

    /// Keep only the keys `keep` says are still wanted (actions that no
    /// longer exist do not keep their failures).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.0.retain(|k, _| keep(k));
    }
}

impl Failure {
    /// The failure as an instance's state reason.
    pub fn reason(&self, now_ms: u64) -> String {
        let wait = self.next_ms.saturating_sub(now_ms).div_ceil(1000);
        let plural = if self.attempts == 1 { "" } else { "s" };
        format!(
            "{} ({} attempt{plural}, retrying in {wait} s)",
            self.error, self.attempts
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap() {
        let mut f = Failures::default();
        let mut now = 0;
        let mut delays = vec![];
        for _ in 0..12 {
            f.failed("i-1", "boom".into(), now);
            let next = f.get("i-1").unwrap().next_ms;
            assert!(f.waiting("i-1", now));
            assert!(!f.waiting("i-1", next));
            delays.push(next - now);
            now = next;
        }
        // 200 ms ±25%, doubling, then capped at 30 s ±25%.
        assert!((150..250).contains(&delays[0]), "{delays:?}");
        assert!(delays[3] > delays[1] * 2, "{delays:?}");
        assert!(
            delays[11] <= MAX_MS * 5 / 4 && delays[11] >= MAX_MS * 3 / 4,
            "{delays:?}"
        );
        // Five tries a second at first would be 60 in 12 s; here 12 tries
        // take far longer.
        assert!(now > 60_000, "{now}");
        assert_eq!(f.succeeded("i-1").unwrap().attempts, 12);
        assert!(!f.waiting("i-1", now));
    }

    #[test]
    fn a_repeated_failure_is_logged_once_then_once_a_minute() {
        let mut f = Failures::default();
        assert_eq!(f.failed("k", "e".into(), 0), Log::First);
        assert_eq!(f.failed("k", "e".into(), 1_000), Log::Quiet);
        assert_eq!(f.failed("k", "e".into(), 30_000), Log::Quiet);
        assert_eq!(f.failed("k", "e".into(), 61_000), Log::Again(3));
        assert_eq!(f.failed("k", "e".into(), 62_000), Log::Quiet);
        let r = f.get("k").unwrap().reason(62_000);
        assert!(r.starts_with("e (5 attempts, retrying in "), "{r}");
    }
}

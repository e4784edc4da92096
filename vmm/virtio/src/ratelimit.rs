//! Rate-limited logging for events a guest can trigger.
//!
//! A hostile or buggy driver can produce malformed requests at the rate of
//! its vCPUs; logging each one would let it flood the host's logs. Every log
//! line a guest can cause goes through a [`LogRateLimiter`], a token bucket
//! that allows a burst and then a steady rate, and reports how many lines it
//! suppressed in between.
//!
//! Where a limiter object has no natural owner (register accesses spread
//! over many call sites), [`warn_limited!`](crate::warn_limited) keeps a
//! static [`LogCounter`] per call site instead: the first [`BURST`]
//! occurrences are logged, then only those whose count is a power of two.
//!
//! ```
//! use ferro_virtio::ratelimit::LogRateLimiter;
//! use ferro_virtio::warn_ratelimited;
//!
//! let limiter = LogRateLimiter::default();
//! warn_ratelimited!(limiter, "malformed request from the guest");
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Default burst: lines logged back to back before limiting starts.
pub const DEFAULT_BURST: u32 = 10;
/// Default refill period: one more line is allowed per period.
pub const DEFAULT_REFILL: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Bucket {
    tokens: u32,
    last_refill: Instant,
    suppressed: u64,
}

/// A token bucket that decides whether a log line may be emitted.
#[derive(Debug)]
pub struct LogRateLimiter {
    burst: u32,
    refill: Duration,
    bucket: Mutex<Bucket>,
}

impl Default for LogRateLimiter {
    fn default() -> Self {
        Self::new(DEFAULT_BURST, DEFAULT_REFILL)
    }
}

impl LogRateLimiter {
    /// A limiter allowing `burst` lines at once and one more per `refill`.
    pub fn new(burst: u32, refill: Duration) -> Self {
        LogRateLimiter {
            burst,
            refill,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                last_refill: Instant::now(),
                suppressed: 0,
            }),
        }
    }

    /// Takes a token. Returns `Some(n)` if the caller may log, where `n` is the
    /// number of lines suppressed since the last allowed one, or `None`.
    pub fn check(&self) -> Option<u64> {
        // A poisoned lock only means another thread panicked while holding
        // it; the counters are still usable.
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        self.refill(&mut bucket);
        if bucket.tokens == 0 {
            bucket.suppressed = bucket.suppressed.saturating_add(1);
            return None;
        }
        bucket.tokens -= 1;
        Some(std::mem::take(&mut bucket.suppressed))
    }

    fn refill(&self, bucket: &mut Bucket) {
        if self.refill.is_zero() {
            bucket.tokens = self.burst;
            return;
        }
        let elapsed = bucket.last_refill.elapsed();
        let periods = elapsed.as_nanos() / self.refill.as_nanos();
        if periods == 0 {
            return;
        }
        let add = u32::try_from(periods).unwrap_or(u32::MAX);
        bucket.tokens = bucket.tokens.saturating_add(add).min(self.burst);
        bucket.last_refill = Instant::now();
    }
}

/// Logs at `warn` level through a [`LogRateLimiter`], adding a `suppressed`
/// field with the number of lines dropped since the previous one.
#[macro_export]
macro_rules! warn_ratelimited {
    ($limiter:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $limiter.check() {
            ::tracing::warn!(suppressed, $($arg)+);
        }
    };
}

/// Occurrences [`warn_limited!`](crate::warn_limited) logs before thinning.
pub const BURST: u64 = 10;

/// Per-call-site occurrence counter behind [`warn_limited!`](crate::warn_limited).
#[derive(Debug, Default)]
pub struct LogCounter(AtomicU64);

impl LogCounter {
    /// A counter that has seen nothing yet.
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Count one occurrence; returns its 1-based number when it should be
    /// logged, `None` when it should be suppressed.
    pub fn tick(&self) -> Option<u64> {
        let n = self.0.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        (n <= BURST || n.is_power_of_two()).then_some(n)
    }
}

/// `tracing::warn!` limited per call site (see the module docs); the event
/// carries an `occurrence` field with the running count.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static COUNTER: $crate::ratelimit::LogCounter = $crate::ratelimit::LogCounter::new();
        if let Some(occurrence) = COUNTER.tick() {
            ::tracing::warn!(occurrence, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_logs_burst_then_powers_of_two() {
        let c = LogCounter::new();
        let logged: Vec<u64> = (0..100).filter_map(|_| c.tick()).collect();
        assert_eq!(logged, vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 32, 64]);
    }

    #[test]
    fn allows_burst_then_limits() {
        let limiter = LogRateLimiter::new(3, Duration::from_secs(3600));
        assert_eq!(limiter.check(), Some(0));
        assert_eq!(limiter.check(), Some(0));
        assert_eq!(limiter.check(), Some(0));
        assert_eq!(limiter.check(), None);
        assert_eq!(limiter.check(), None);
    }

    #[test]
    fn refills_and_reports_suppressed() {
        let limiter = LogRateLimiter::new(1, Duration::from_millis(20));
        assert_eq!(limiter.check(), Some(0));
        assert_eq!(limiter.check(), None);
        assert_eq!(limiter.check(), None);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(limiter.check(), Some(2));
    }
}

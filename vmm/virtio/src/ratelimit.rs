//! Rate-limited logging for events a guest can trigger.
//!
//! A hostile or buggy driver can produce malformed requests at the rate of
//! its vCPUs; logging each one would let it flood the host's logs. Every log
//! line a guest can cause goes through a [`LogRateLimiter`], a token bucket
//! that allows a burst and then a steady rate, and reports how many lines it
//! suppressed in between.
//!
//! ```
//! use ferro_virtio::ratelimit::LogRateLimiter;
//! use ferro_virtio::warn_ratelimited;
//!
//! let limiter = LogRateLimiter::default();
//! warn_ratelimited!(limiter, "malformed request from the guest");
//! ```

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

#[cfg(test)]
mod tests {
    use super::*;

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

//! Rate-limited logging for events a guest can trigger at will.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lets at most `per_second` messages through each second and counts the rest.
pub struct RateLimited {
    per_second: u32,
    window: Mutex<(Instant, u32, u64)>,
}

impl RateLimited {
    /// A limiter allowing `per_second` lines per second.
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second,
            window: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// Whether a line may be logged now; returns the number suppressed since
    /// the last line that went through.
    pub fn allow(&self) -> Option<u64> {
        let mut w = self.window.lock().expect("rate limiter poisoned");
        if w.0.elapsed() >= Duration::from_secs(1) {
            *w = (Instant::now(), 0, w.2);
        }
        if w.1 < self.per_second {
            w.1 += 1;
            let dropped = w.2;
            w.2 = 0;
            Some(dropped)
        } else {
            w.2 += 1;
            None
        }
    }

    /// Log a warning built by `msg` if the limit allows.
    pub fn warn(&self, msg: impl FnOnce() -> String) {
        if let Some(dropped) = self.allow() {
            tracing::warn!(suppressed = dropped, "{}", msg());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_counts() {
        let r = RateLimited::new(2);
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(r.allow(), None);
        r.window.lock().unwrap().0 -= Duration::from_secs(2);
        assert_eq!(r.allow(), Some(2));
    }
}

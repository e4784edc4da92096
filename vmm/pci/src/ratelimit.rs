//! Rate-limited logging for events a guest can trigger at will.
//!
//! A hostile guest can hammer a register with invalid accesses; logging every
//! one would let it fill the host's disks. Each call site of the crate's
//! `warn_limited!` macro owns a [`LogCounter`]: the first
//! [`BURST`] occurrences are logged, after that only the ones whose count is a
//! power of two, so the log grows with the logarithm of the guest's effort
//! while still showing that the event keeps happening.

use std::sync::atomic::{AtomicU64, Ordering};

/// Occurrences logged unconditionally before thinning starts.
pub const BURST: u64 = 10;

/// Per-call-site occurrence counter.
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

/// `tracing::warn!` with a per-call-site limit (see the module docs).
/// The event carries an `occurrence` field with the running count.
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static COUNTER: $crate::ratelimit::LogCounter = $crate::ratelimit::LogCounter::new();
        if let Some(occurrence) = COUNTER.tick() {
            tracing::warn!(occurrence, $($arg)+);
        }
    }};
}
pub(crate) use warn_limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_powers_of_two() {
        let c = LogCounter::new();
        let logged: Vec<u64> = (0..100).filter_map(|_| c.tick()).collect();
        assert_eq!(logged, vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 32, 64]);
    }
}

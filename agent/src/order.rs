//! The order of what the agent reports, so the controller never lets an
//! older report override a newer one.
//!
//! Every change of an instance is stamped with a sequence number from one
//! strictly increasing counter (`max(last + 1, unix µs)`, so it also
//! increases across agent restarts; at start it is raised past every
//! persisted stamp). A listing (`ListInstances`, hence a heartbeat) carries
//! the counter value taken when it was read: an instance it does not list
//! is absent only if nothing newer than the listing is known of it.
//!
//! For that to hold, stamping a change and making it visible happen under
//! [`publishing`], and a listing reads everything under [`listing`]: each
//! change is then either wholly before a listing (stamp below the
//! listing's, change included) or wholly after (stamp above).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

static LAST: AtomicU64 = AtomicU64::new(0);
static LOCK: RwLock<()> = RwLock::new(());

/// The next sequence number.
pub fn next_seq() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let next = (prev + 1).max(now);
        match LAST.compare_exchange_weak(prev, next, Ordering::SeqCst, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(p) => prev = p,
        }
    }
}

/// Raise the counter past `seq` (a stamp persisted by an earlier run).
pub fn seen(seq: u64) {
    LAST.fetch_max(seq, Ordering::SeqCst);
}

/// Held while a change is stamped and made visible.
pub fn publishing() -> RwLockReadGuard<'static, ()> {
    LOCK.read().unwrap_or_else(|e| e.into_inner())
}

/// Held while a listing takes its stamp and reads.
pub fn listing() -> RwLockWriteGuard<'static, ()> {
    LOCK.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_only_increase_even_past_a_persisted_one() {
        let a = next_seq();
        let b = next_seq();
        assert!(b > a);
        seen(b + 1_000_000_000);
        assert!(next_seq() > b + 1_000_000_000);
    }
}

//! One DHCP task per local interface with a TAP, kept in step with the
//! state by [`Servers::sync`]: started when the TAP appears, given the new
//! lease when it changes, restarted when the TAP is recreated (a new
//! ifindex), stopped when the interface leaves the state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::socket::AsyncPacketSocket;
use super::{respond, Lease, SERVER_PORT};

/// What the DHCP servers did, over all interfaces.
#[derive(Debug, Default)]
pub struct Counters {
    /// Answers sent.
    pub answered: AtomicU64,
    /// Well-formed frames not answered (another MAC, a RELEASE...).
    pub ignored: AtomicU64,
    /// Malformed frames dropped.
    pub malformed: AtomicU64,
    /// Answers the socket refused.
    pub send_errors: AtomicU64,
}

/// A lease to serve on a TAP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// The TAP.
    pub tap: String,
    /// Its current ifindex.
    pub ifindex: u32,
    /// The VPC (for logs).
    pub vpc_id: String,
    /// What to give.
    pub lease: Lease,
}

struct Running {
    ifindex: u32,
    lease: watch::Sender<Lease>,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The running DHCP tasks, by TAP.
#[derive(Default)]
pub struct Servers {
    running: HashMap<String, Running>,
    counters: Arc<Counters>,
}

impl Servers {
    /// The shared counters.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// Serve exactly `wanted`.
    pub fn sync(&mut self, wanted: Vec<Wanted>) {
        let keep: HashMap<&str, &Wanted> = wanted.iter().map(|w| (w.tap.as_str(), w)).collect();
        self.running.retain(|tap, r| {
            keep.get(tap.as_str())
                .is_some_and(|w| w.ifindex == r.ifindex && !r.task.is_finished())
        });
        for w in &wanted {
            match self.running.get(&w.tap) {
                Some(r) => {
                    r.lease.send_if_modified(|l| {
                        let changed = *l != w.lease;
                        if changed {
                            *l = w.lease.clone();
                        }
                        changed
                    });
                }
                None => {
                    let (tx, rx) = watch::channel(w.lease.clone());
                    let span = tracing::info_span!("dhcp", vpc_id = %w.vpc_id,
                        instance_id = %w.lease.instance_id, tap = %w.tap);
                    let task =
                        tokio::spawn(serve(w.ifindex, rx, self.counters.clone()).instrument(span));
                    let r = Running {
                        ifindex: w.ifindex,
                        lease: tx,
                        task,
                    };
                    self.running.insert(w.tap.clone(), r);
                }
            }
        }
    }

    /// How many TAPs are served.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }
}

/// Logs at most once per interval, counting what it held back.
#[derive(Debug)]
pub struct RateLimit {
    every: Duration,
    last: Option<Instant>,
    held: u64,
}

impl RateLimit {
    /// At most once per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            held: 0,
        }
    }

    /// `Some(held back since the last time)` when a line may be logged now.
    pub fn allow(&mut self) -> Option<u64> {
        if self.last.is_some_and(|t| t.elapsed() < self.every) {
            self.held += 1;
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.held))
    }
}

async fn serve(ifindex: u32, lease: watch::Receiver<Lease>, counters: Arc<Counters>) {
    let sock = match AsyncPacketSocket::open(ifindex, SERVER_PORT) {
        Ok(s) => s,
        Err(e) => {
            // The task ends; the next sync starts another.
            tracing::warn!("cannot open the DHCP socket: {e}");
            return;
        }
    };
    tracing::debug!("serving DHCP");
    let mut buf = vec![0u8; 2048];
    let mut bad_log = RateLimit::new(Duration::from_secs(60));
    let mut err_log = RateLimit::new(Duration::from_secs(60));
    loop {
        let n = match sock.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                // ENETDOWN while the TAP is down: wait for it to come up.
                if let Some(held) = err_log.allow() {
                    tracing::warn!(held, "DHCP socket: {e}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let l = lease.borrow().clone();
        let r = respond(&l, &buf[..n]);
        tracing::trace!(len = n, answer = ?r.as_ref().map(|a| a.as_ref().map(Vec::len)), "frame from the guest");
        match r {
            Ok(Some(frame)) => match sock.send(&frame) {
                Ok(()) => {
                    counters.answered.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    counters.send_errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(held) = err_log.allow() {
                        tracing::warn!(held, "cannot send a DHCP answer: {e}");
                    }
                }
            },
            Ok(None) => {
                counters.ignored.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                counters.malformed.fetch_add(1, Ordering::Relaxed);
                if let Some(held) = bad_log.allow() {
                    tracing::info!(held, "dropped a malformed DHCP frame from the guest: {e}");
                }
            }
        }
    }
}

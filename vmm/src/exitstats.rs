//! VM-exit accounting for finding where a guest's boot time goes.
//!
//! Off unless `FERRO_VMM_EXIT_STATS=1` is set: then every port I/O and MMIO
//! exit is counted by port and by 4 KiB page, and the totals and the busiest
//! ports and pages are printed to stderr when the VM ends. Under nested
//! virtualisation each exit costs far more than on bare metal, so exit
//! counts are what decides boot time there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Counters shared by every vCPU.
pub struct ExitStats {
    start: Instant,
    pio: Vec<AtomicU64>,
    mmio: Mutex<HashMap<u64, u64>>,
    hlt: AtomicU64,
    other: AtomicU64,
}

impl ExitStats {
    /// Counters, if `FERRO_VMM_EXIT_STATS` asks for them.
    pub fn from_env() -> Option<Self> {
        (std::env::var("FERRO_VMM_EXIT_STATS").as_deref() == Ok("1")).then(Self::new)
    }

    /// Zeroed counters.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            pio: (0..=u16::MAX as usize).map(|_| AtomicU64::new(0)).collect(),
            mmio: Mutex::new(HashMap::new()),
            hlt: AtomicU64::new(0),
            other: AtomicU64::new(0),
        }
    }

    pub fn pio(&self, port: u16) {
        self.pio[port as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn mmio(&self, addr: u64) {
        let mut m = self.mmio.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(addr & !0xfff).or_default() += 1;
    }

    pub fn hlt(&self) {
        self.hlt.fetch_add(1, Ordering::Relaxed);
    }

    pub fn other(&self) {
        self.other.fetch_add(1, Ordering::Relaxed);
    }

    /// A human-readable summary: totals, then the 12 busiest ports and pages.
    pub fn summary(&self) -> String {
        let mut ports: Vec<(u16, u64)> = self
            .pio
            .iter()
            .enumerate()
            .map(|(p, c)| (p as u16, c.load(Ordering::Relaxed)))
            .filter(|(_, c)| *c > 0)
            .collect();
        ports.sort_by_key(|p| std::cmp::Reverse(p.1));
        let mut pages: Vec<(u64, u64)> = self
            .mmio
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(a, c)| (*a, *c))
            .collect();
        pages.sort_by_key(|p| std::cmp::Reverse(p.1));
        let pio_total: u64 = ports.iter().map(|p| p.1).sum();
        let mmio_total: u64 = pages.iter().map(|p| p.1).sum();
        let mut s = format!(
            "exit stats after {:.2} s: pio {pio_total}, mmio {mmio_total}, hlt {}, other {}\n",
            self.start.elapsed().as_secs_f64(),
            self.hlt.load(Ordering::Relaxed),
            self.other.load(Ordering::Relaxed)
        );
        s.push_str("  ports:");
        for (p, c) in ports.iter().take(12) {
            s.push_str(&format!(" {p:#x}={c}"));
        }
        s.push_str("\n  mmio pages:");
        for (a, c) in pages.iter().take(12) {
            s.push_str(&format!(" {a:#x}={c}"));
        }
        s
    }
}

impl Default for ExitStats {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_port_and_page() {
        let s = ExitStats::new();
        for _ in 0..3 {
            s.pio(0xcf8);
        }
        s.pio(0x3f8);
        s.mmio(0xe000_0004);
        s.mmio(0xe000_0ffc);
        s.hlt();
        let text = s.summary();
        assert!(text.contains("pio 4, mmio 2, hlt 1"), "{text}");
        assert!(text.contains("0xcf8=3 0x3f8=1"), "{text}");
        assert!(text.contains("0xe0000000=2"), "{text}");
    }
}

//! An address space (port I/O or MMIO) that maps address ranges to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that occupies a range of a [`Bus`].
pub trait BusDevice: Send {
    /// Read `data.len()` bytes at `offset` within the range starting at `base`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Write `data` at `offset` within the range starting at `base`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Errors from changing a [`Bus`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// A zero-length range was given.
    #[error("range at {0:#x} has zero length")]
    Empty(u64),
    /// No device starts at the given base.
    #[error("no device at {0:#x}")]
    NotFound(u64),
}

/// A resolved access: range base, offset inside the range, device.
type Resolved = (u64, u64, Arc<Mutex<dyn BusDevice>>);

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Maps ranges `[base, base + len)` to devices; ranges never overlap.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Place `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        let overlaps_prev = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(b, e)| b + e.len > base);
        if overlaps_prev {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Remove the device whose range starts at `base`.
    pub fn remove(&mut self, base: u64) -> Result<Arc<Mutex<dyn BusDevice>>, BusError> {
        self.ranges
            .remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotFound(base))
    }

    /// Move the range starting at `old` so that it starts at `new`.
    pub fn relocate(&mut self, old: u64, new: u64) -> Result<(), BusError> {
        let entry = self.ranges.remove(&old).ok_or(BusError::NotFound(old))?;
        let (len, device) = (entry.len, entry.device);
        if let Err(e) = self.insert(new, len, device.clone()) {
            self.ranges.insert(old, Entry { len, device });
            return Err(e);
        }
        Ok(())
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<Resolved> {
        let (base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        if offset.checked_add(size as u64)? > entry.len {
            return None;
        }
        Some((*base, offset, entry.device.clone()))
    }

    /// Dispatch a read; returns false (and leaves `data` untouched) when no
    /// device covers the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((base, offset, dev)) => {
                dev.lock()
                    .expect("bus device poisoned")
                    .read(base, offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatch a write; returns false when no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((base, offset, dev)) => {
                dev.lock()
                    .expect("bus device poisoned")
                    .write(base, offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, u64)>);
    impl BusDevice for Echo {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, _data: &[u8]) {
            self.0.push((base, offset));
        }
    }

    #[test]
    fn dispatch_and_bounds() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(0x100, 0x10, dev.clone()).unwrap();
        let mut b = [0u8; 2];
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b, [4, 4]);
        assert!(!bus.read(0x10f, &mut b), "access straddling the end");
        assert!(!bus.read(0xff, &mut [0u8; 1]));
        assert!(bus.write(0x10e, &[1, 2]));
        assert_eq!(dev.lock().unwrap().0, vec![(0x100, 0xe)]);
    }

    #[test]
    fn overlap_rejected_and_relocate() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(0x100, 0x10, dev.clone()).unwrap();
        assert!(bus.insert(0x108, 0x10, dev.clone()).is_err());
        assert!(bus.insert(0xf8, 0x10, dev.clone()).is_err());
        assert!(bus.insert(0x110, 0x10, dev.clone()).is_ok());
        assert_eq!(bus.insert(0x0, 0, dev.clone()), Err(BusError::Empty(0)));
        assert!(bus.relocate(0x100, 0x118).is_err(), "collides with 0x110");
        bus.relocate(0x100, 0x200).unwrap();
        assert!(bus.read(0x200, &mut [0u8; 4]));
        assert!(!bus.read(0x100, &mut [0u8; 4]));
    }
}

//! MSI-X: the capability, the vector table and the pending bit array (PBA).
//!
//! [`MsixConfig`] holds the table and PBA a device exposes in one of its
//! BARs and the two message-control bits (enable, function mask) the guest
//! writes through the capability. [`MsixConfig::trigger`] delivers a vector
//! through the [`MsiSink`] when MSI-X is enabled and neither the function nor
//! the vector is masked; otherwise it sets the vector's pending bit, and the
//! message is delivered (once) as soon as it is unmasked.
//!
//! Table layout (PCI spec 6.8.2): 16 bytes per vector — message address low,
//! message address high, message data, vector control (bit 0 = masked).
//! The table and the PBA accept aligned 4- and 8-byte accesses; other
//! accesses are dropped (reads return zeroes).

use std::io;
use std::sync::Arc;

use crate::interrupt::{MsiMessage, MsiSink};
use ferro_virtio::warn_limited;

/// Bytes per MSI-X table entry.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// Most vectors a function may have.
pub const MAX_MSIX_VECTORS: u16 = 2048;
/// Message control: MSI-X enable.
pub const MSIX_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Writable bits of the capability's first dword (the two control bits
/// above, in the message-control half).
pub const MSIX_CAP_WRITABLE: u32 = ((MSIX_ENABLE | MSIX_FUNCTION_MASK) as u32) << 16;
/// Length of the capability body after the id and next-pointer bytes.
pub const MSIX_CAP_BODY_LEN: usize = 10;

const VECTOR_CTL_MASKED: u32 = 1;

/// Errors from creating an MSI-X function.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsixError {
    /// The vector count is zero or above [`MAX_MSIX_VECTORS`].
    #[error("invalid MSI-X vector count {0}")]
    VectorCount(usize),
}

/// Capability body (after id/next) for `num_vectors` vectors with the table
/// at `table_offset` of BAR `table_bar` and the PBA at `pba_offset` of BAR
/// `pba_bar`. Offsets must be 8-byte aligned.
pub fn capability_body(
    num_vectors: u16,
    table_bar: u8,
    table_offset: u32,
    pba_bar: u8,
    pba_offset: u32,
) -> [u8; MSIX_CAP_BODY_LEN] {
    let mut body = [0u8; MSIX_CAP_BODY_LEN];
    body[0..2].copy_from_slice(&(num_vectors.saturating_sub(1) & 0x7ff).to_le_bytes());
    body[2..6].copy_from_slice(&(table_offset | u32::from(table_bar & 0x7)).to_le_bytes());
    body[6..10].copy_from_slice(&(pba_offset | u32::from(pba_bar & 0x7)).to_le_bytes());
    body
}

/// Size in bytes of the PBA for `num_vectors` vectors (whole qwords).
pub fn pba_size(num_vectors: u16) -> u64 {
    u64::from(num_vectors).div_ceil(64) * 8
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MsixEntry {
    address_low: u32,
    address_high: u32,
    data: u32,
    control: u32,
}

impl Default for MsixEntry {
    /// Vectors come out of reset masked.
    fn default() -> Self {
        Self {
            address_low: 0,
            address_high: 0,
            data: 0,
            control: VECTOR_CTL_MASKED,
        }
    }
}

impl MsixEntry {
    fn masked(&self) -> bool {
        self.control & VECTOR_CTL_MASKED != 0
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.address_high) << 32 | u64::from(self.address_low),
            data: self.data,
        }
    }

    fn read_dword(&self, field: u64) -> u32 {
        match field {
            0 => self.address_low,
            1 => self.address_high,
            2 => self.data,
            _ => self.control,
        }
    }

    fn write_dword(&mut self, field: u64, value: u32) {
        match field {
            0 => self.address_low = value,
            1 => self.address_high = value,
            2 => self.data = value,
            _ => self.control = value & VECTOR_CTL_MASKED,
        }
    }
}

/// MSI-X state of one function (see the module docs).
pub struct MsixConfig {
    table: Vec<MsixEntry>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    sink: Arc<dyn MsiSink>,
}

impl MsixConfig {
    /// `num_vectors` masked vectors, MSI-X disabled, delivering to `sink`.
    pub fn new(num_vectors: usize, sink: Arc<dyn MsiSink>) -> Result<Self, MsixError> {
        if num_vectors == 0 || num_vectors > usize::from(MAX_MSIX_VECTORS) {
            return Err(MsixError::VectorCount(num_vectors));
        }
        Ok(Self {
            table: vec![MsixEntry::default(); num_vectors],
            pba: vec![0; num_vectors.div_ceil(64)],
            enabled: false,
            function_masked: false,
            sink,
        })
    }

    /// Number of vectors in the table.
    pub fn num_vectors(&self) -> u16 {
        self.table.len() as u16
    }

    /// Whether the guest enabled MSI-X.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Apply the message-control word the guest wrote in the capability;
    /// delivers pending vectors that this unmasks.
    pub fn set_message_control(&mut self, control: u16) {
        self.enabled = control & MSIX_ENABLE != 0;
        self.function_masked = control & MSIX_FUNCTION_MASK != 0;
        for vector in 0..self.num_vectors() {
            self.deliver_if_pending(vector);
        }
    }

    /// Signal `vector`, or mark it pending if it cannot be delivered now.
    pub fn trigger(&mut self, vector: u16) -> io::Result<()> {
        let entry = *self.table.get(usize::from(vector)).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no MSI-X vector {vector}"),
            )
        })?;
        if self.enabled && !self.function_masked && !entry.masked() {
            self.sink.send(entry.message())
        } else {
            self.set_pending(vector, true);
            Ok(())
        }
    }

    /// Whether `vector`'s pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        let (word, bit) = (usize::from(vector) / 64, vector % 64);
        self.pba.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    /// Guest read of the table at `offset` (relative to the table start).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(dwords) = Self::dwords(offset, data.len()) else {
            warn_limited!(offset, len = data.len(), "invalid MSI-X table read");
            return;
        };
        for (i, dword_offset) in dwords.enumerate() {
            let Some(entry) = self.entry_at(dword_offset) else {
                return;
            };
            let value = entry.read_dword(dword_offset % MSIX_TABLE_ENTRY_SIZE / 4);
            data[i * 4..i * 4 + 4].copy_from_slice(&value.to_le_bytes());
        }
    }

    /// Guest write of the table at `offset` (relative to the table start).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some(dwords) = Self::dwords(offset, data.len()) else {
            warn_limited!(offset, len = data.len(), "invalid MSI-X table write");
            return;
        };
        for (i, dword_offset) in dwords.enumerate() {
            let index = dword_offset / MSIX_TABLE_ENTRY_SIZE;
            let Some(entry) = self.table.get_mut(index as usize) else {
                warn_limited!(offset, "MSI-X table write past the last vector");
                return;
            };
            let mut bytes = [0u8; 4];
            bytes.copy_from_slice(&data[i * 4..i * 4 + 4]);
            entry.write_dword(
                dword_offset % MSIX_TABLE_ENTRY_SIZE / 4,
                u32::from_le_bytes(bytes),
            );
            self.deliver_if_pending(index as u16);
        }
    }

    /// Guest read of the PBA at `offset` (relative to the PBA start).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if Self::dwords(offset, data.len()).is_none() {
            warn_limited!(offset, len = data.len(), "invalid MSI-X PBA read");
            return;
        }
        let Some(word) = self.pba.get((offset / 8) as usize) else {
            return;
        };
        let bytes = word.to_le_bytes();
        let start = (offset % 8) as usize;
        data.copy_from_slice(&bytes[start..start + data.len()]);
    }

    /// Byte offsets of the dwords an aligned 4- or 8-byte access covers.
    fn dwords(offset: u64, len: usize) -> Option<impl Iterator<Item = u64>> {
        let valid = matches!(len, 4 | 8) && offset % len as u64 == 0;
        valid.then(|| (0..len as u64 / 4).map(move |i| offset + i * 4))
    }

    fn entry_at(&self, offset: u64) -> Option<&MsixEntry> {
        self.table
            .get(usize::try_from(offset / MSIX_TABLE_ENTRY_SIZE).ok()?)
    }

    fn set_pending(&mut self, vector: u16, pending: bool) {
        let (word, bit) = (usize::from(vector) / 64, vector % 64);
        if let Some(w) = self.pba.get_mut(word) {
            if pending {
                *w |= 1 << bit;
            } else {
                *w &= !(1 << bit);
            }
        }
    }

    fn deliver_if_pending(&mut self, vector: u16) {
        let Some(entry) = self.table.get(usize::from(vector)).copied() else {
            return;
        };
        if !self.is_pending(vector) || !self.enabled || self.function_masked || entry.masked() {
            return;
        }
        self.set_pending(vector, false);
        if let Err(e) = self.sink.send(entry.message()) {
            warn_limited!(vector, error = %e, "cannot deliver pending MSI-X vector");
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records every message sent.
    #[derive(Default)]
    pub(crate) struct RecordingSink(pub Mutex<Vec<MsiMessage>>);

    impl MsiSink for RecordingSink {
        fn send(&self, msg: MsiMessage) -> io::Result<()> {
            self.0.lock().unwrap().push(msg);
            Ok(())
        }
    }

    impl RecordingSink {
        pub(crate) fn take(&self) -> Vec<MsiMessage> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn setup(vectors: usize) -> (MsixConfig, Arc<RecordingSink>) {
        let sink = Arc::new(RecordingSink::default());
        (MsixConfig::new(vectors, sink.clone()).unwrap(), sink)
    }

    fn program(msix: &mut MsixConfig, vector: u64, address: u64, data: u32) {
        let base = vector * MSIX_TABLE_ENTRY_SIZE;
        msix.write_table(base, &address.to_le_bytes());
        msix.write_table(base + 8, &data.to_le_bytes());
    }

    fn unmask(msix: &mut MsixConfig, vector: u64) {
        msix.write_table(vector * MSIX_TABLE_ENTRY_SIZE + 12, &0u32.to_le_bytes());
    }

    #[test]
    fn capability_layout() {
        let body = capability_body(3, 0, 0x4000, 0, 0x5000);
        assert_eq!(body, [2, 0, 0x00, 0x40, 0, 0, 0x00, 0x50, 0, 0]);
        assert_eq!(pba_size(3), 8);
        assert_eq!(pba_size(65), 16);
        assert!(MsixConfig::new(0, Arc::new(RecordingSink::default())).is_err());
        assert!(MsixConfig::new(2049, Arc::new(RecordingSink::default())).is_err());
    }

    #[test]
    fn table_reads_back_and_starts_masked() {
        let (mut msix, _) = setup(2);
        let mut q = [0u8; 8];
        msix.read_table(8, &mut q);
        assert_eq!(u64::from_le_bytes(q), 1 << 32, "data 0, control masked");
        program(&mut msix, 1, 0xfee0_1000, 0x4041);
        msix.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_1000);
        let mut d = [0u8; 4];
        msix.read_table(24, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x4041);
        // Reserved vector-control bits are read-only zero.
        msix.write_table(28, &u32::MAX.to_le_bytes());
        msix.read_table(28, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);
    }

    #[test]
    fn invalid_table_accesses_are_ignored() {
        let (mut msix, _) = setup(1);
        program(&mut msix, 0, 0xfee0_0000, 7);
        msix.write_table(2, &[0xff; 4]);
        msix.write_table(8, &[0xff; 2]);
        msix.write_table(4, &[0xff; 8]);
        msix.write_table(16, &[0xff; 4]);
        msix.write_table(u64::MAX - 3, &[0xff; 4]);
        let mut q = [0xaau8; 8];
        msix.read_table(0, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xfee0_0000);
        msix.read_table(16, &mut q);
        assert_eq!(q, [0; 8], "past the table reads zero");
        let mut b = [0xaau8; 1];
        msix.read_table(0, &mut b);
        assert_eq!(b, [0]);
        msix.read_pba(3, &mut [0u8; 4]);
        msix.read_pba(1 << 40, &mut [0u8; 8]);
    }

    #[test]
    fn delivery_when_enabled_and_unmasked() {
        let (mut msix, sink) = setup(2);
        program(&mut msix, 1, 0xfee0_0000, 0x31);
        unmask(&mut msix, 1);
        msix.set_message_control(MSIX_ENABLE);
        msix.trigger(1).unwrap();
        assert_eq!(
            sink.take(),
            vec![MsiMessage {
                address: 0xfee0_0000,
                data: 0x31
            }]
        );
        assert!(msix.trigger(2).is_err());
    }

    #[test]
    fn masked_vector_pends_and_unmask_delivers_once() {
        let (mut msix, sink) = setup(70);
        msix.set_message_control(MSIX_ENABLE);
        program(&mut msix, 65, 0xfee0_0000, 0x99);
        msix.trigger(65).unwrap();
        msix.trigger(65).unwrap();
        assert!(sink.take().is_empty());
        assert!(msix.is_pending(65));
        let mut q = [0u8; 8];
        msix.read_pba(8, &mut q);
        assert_eq!(u64::from_le_bytes(q), 1 << 1);
        let mut d = [0u8; 4];
        msix.read_pba(12, &mut d);
        assert_eq!(d, [0; 4]);
        unmask(&mut msix, 65);
        assert_eq!(
            sink.take(),
            vec![MsiMessage {
                address: 0xfee0_0000,
                data: 0x99
            }]
        );
        assert!(!msix.is_pending(65));
        unmask(&mut msix, 65);
        assert!(sink.take().is_empty(), "delivered exactly once");
    }

    #[test]
    fn function_mask_and_enable_gate_delivery() {
        let (mut msix, sink) = setup(1);
        program(&mut msix, 0, 0xfee0_0000, 5);
        unmask(&mut msix, 0);
        msix.trigger(0).unwrap();
        assert!(msix.is_pending(0), "disabled: pending");
        msix.set_message_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        assert!(sink.take().is_empty());
        msix.trigger(0).unwrap();
        assert!(sink.take().is_empty());
        msix.set_message_control(MSIX_ENABLE);
        assert_eq!(sink.take().len(), 1);
        msix.set_message_control(MSIX_ENABLE);
        assert!(sink.take().is_empty());
    }
}

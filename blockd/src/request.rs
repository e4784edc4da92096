//! The sans-IO virtio-blk request decoder.
//!
//! A request arrives as a descriptor chain: a 16-byte driver-readable header
//! (`struct virtio_blk_outhdr`: type, reserved, sector), data buffers, and a
//! device-writable status byte last. [`decode`] sees only the shape of the
//! chain ([`Segment`]s: length and direction) and the header bytes, never
//! guest memory or the store, so every rule is unit-tested and fuzzed
//! without a VMM:
//!
//! - the header is the first segment, driver-readable, at least 16 bytes;
//! - the status is the last segment, device-writable, at least 1 byte;
//! - data segments point the right way (device-writable for `IN` and
//!   `GET_ID`, driver-readable for `OUT`), there are at most
//!   [`MAX_SEGMENTS`] of them and at most [`MAX_REQUEST_BYTES`] in total;
//! - `IN`/`OUT` carry whole, non-zero sectors and
//!   `sector * 512 + len` neither overflows nor passes the capacity.
//!
//! A chain that breaks a rule gets `VIRTIO_BLK_S_IOERR` (unknown types get
//! `VIRTIO_BLK_S_UNSUPP`), written only when [`status_fits`] holds.

use std::ops::Range;

/// Bytes per sector, the unit of the header and of the capacity.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the request header.
pub const HEADER_LEN: usize = 16;
/// Largest data transfer of one request (4 MiB, as ferro-vmm's own disk).
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;
/// Most descriptors in one chain (the queue size).
pub const MAX_SEGMENTS: usize = 256;
/// Length of the `GET_ID` serial.
pub const ID_LEN: usize = 20;

/// `VIRTIO_BLK_S_OK`.
pub const S_OK: u8 = 0;
/// `VIRTIO_BLK_S_IOERR`.
pub const S_IOERR: u8 = 1;
/// `VIRTIO_BLK_S_UNSUPP`.
pub const S_UNSUPP: u8 = 2;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// One descriptor of a chain as the decoder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Buffer length in bytes.
    pub len: u32,
    /// The device may write it (`VRING_DESC_F_WRITE`).
    pub writable: bool,
}

/// What a valid request asks the store for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at byte `offset` into the data segments.
    Read {
        /// Byte offset in the volume.
        offset: u64,
        /// Bytes to transfer.
        len: u64,
    },
    /// Write the data segments (`len` bytes) at byte `offset`.
    Write {
        /// Byte offset in the volume.
        offset: u64,
        /// Bytes to transfer.
        len: u64,
    },
    /// Make every completed write durable.
    Flush,
    /// Copy the serial (up to `len` bytes of it) into the data segments.
    GetId {
        /// Room the driver gave.
        len: u64,
    },
}

/// A decoded request: the operation and which segments carry its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// Indices of the data segments in the chain.
    pub data: Range<usize>,
}

/// Why a chain is not a request we execute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer than two segments, or more than [`MAX_SEGMENTS`].
    #[error("chain of {0} segments is not header + data + status")]
    Shape(usize),
    /// The last segment cannot take the status byte.
    #[error("last segment is not a device-writable status byte")]
    BadStatus,
    /// The first segment is not a readable 16-byte header, or it could not
    /// be read.
    #[error("first segment is not a readable 16-byte header")]
    BadHeader,
    /// A data segment points the wrong way for the request type.
    #[error("data segment {0} has the wrong direction")]
    WrongDirection(usize),
    /// More than [`MAX_REQUEST_BYTES`] of data.
    #[error("request carries more than {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
    /// `IN`/`OUT` data is not a non-zero whole number of sectors.
    #[error("data length {0} is not a non-zero multiple of 512")]
    Unaligned(u64),
    /// The transfer ends past the capacity (or overflows).
    #[error("sector {sector} + {len} bytes is past the end of the volume")]
    PastCapacity {
        /// First sector.
        sector: u64,
        /// Data length in bytes.
        len: u64,
    },
    /// A type we do not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl DecodeError {
    /// The status byte this error answers with.
    pub fn status(&self) -> u8 {
        match self {
            DecodeError::Unsupported(_) => S_UNSUPP,
            _ => S_IOERR,
        }
    }
}

/// True when the chain's last segment can take the status byte, so even a
/// rejected request can be answered.
pub fn status_fits(segs: &[Segment]) -> bool {
    segs.last().is_some_and(|s| s.writable && s.len >= 1)
}

/// True when the first segment has the shape of a header; only then does
/// the caller read `header` bytes for [`decode`].
pub fn header_fits(segs: &[Segment]) -> bool {
    segs.first()
        .is_some_and(|s| !s.writable && s.len as usize >= HEADER_LEN)
}

/// Decodes a chain of `segs` whose header bytes are `header` (`None` if it
/// could not be read) for a volume of `capacity` sectors.
pub fn decode(
    segs: &[Segment],
    header: Option<[u8; HEADER_LEN]>,
    capacity: u64,
) -> Result<Request, DecodeError> {
    if segs.len() < 2 || segs.len() > MAX_SEGMENTS {
        return Err(DecodeError::Shape(segs.len()));
    }
    if !status_fits(segs) {
        return Err(DecodeError::BadStatus);
    }
    let header = header
        .filter(|_| header_fits(segs))
        .ok_or(DecodeError::BadHeader)?;
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    let data = 1..segs.len() - 1;
    let writable = match kind {
        T_IN | T_GET_ID => Some(true),
        T_OUT => Some(false),
        // FLUSH carries no data; its buffers (if any) are never touched.
        T_FLUSH => None,
        other => return Err(DecodeError::Unsupported(other)),
    };
    let len = data_len(&segs[data.clone()], writable)?;
    let op = match kind {
        T_IN => Op::Read {
            offset: check_range(sector, len, capacity)?,
            len,
        },
        T_OUT => Op::Write {
            offset: check_range(sector, len, capacity)?,
            len,
        },
        T_FLUSH => Op::Flush,
        _ => Op::GetId { len },
    };
    Ok(Request { op, data })
}

/// Total data length, checking directions and the size cap.
fn data_len(data: &[Segment], writable: Option<bool>) -> Result<u64, DecodeError> {
    let mut total = 0u64;
    for (i, seg) in data.iter().enumerate() {
        if writable.is_some_and(|w| w != seg.writable) {
            return Err(DecodeError::WrongDirection(i + 1));
        }
        total += u64::from(seg.len);
        if total > MAX_REQUEST_BYTES {
            return Err(DecodeError::TooLarge);
        }
    }
    Ok(total)
}

/// The byte offset of `sector`, if `len` bytes from there fit the volume.
fn check_range(sector: u64, len: u64, capacity: u64) -> Result<u64, DecodeError> {
    if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
        return Err(DecodeError::Unaligned(len));
    }
    let offset = sector.checked_mul(SECTOR_SIZE);
    let end = offset.and_then(|o| o.checked_add(len));
    match (offset, end) {
        (Some(offset), Some(end)) if end <= capacity.saturating_mul(SECTOR_SIZE) => Ok(offset),
        _ => Err(DecodeError::PastCapacity { sector, len }),
    }
}

/// Fuzzing entry point: decodes a request described entirely by `input`.
///
/// Layout: capacity (u64 LE, sectors), the 16 header bytes, then 5 bytes per
/// segment (length u32 LE, flags: bit 0 = device-writable). Short input
/// decodes what is there; nothing in it can make this panic.
pub fn decode_bytes(input: &[u8]) -> Result<Request, DecodeError> {
    let mut capacity = [0u8; 8];
    let n = input.len().min(8);
    capacity[..n].copy_from_slice(&input[..n]);
    let rest = input.get(8..).unwrap_or_default();
    let header: Option<[u8; HEADER_LEN]> = rest.get(..HEADER_LEN).and_then(|h| h.try_into().ok());
    let segs: Vec<Segment> = rest
        .get(HEADER_LEN..)
        .unwrap_or_default()
        .chunks_exact(5)
        .take(MAX_SEGMENTS + 1)
        .map(|c| Segment {
            len: u32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            writable: c[4] & 1 != 0,
        })
        .collect();
    decode(&segs, header, u64::from_le_bytes(capacity))
}

#[cfg(test)]
mod tests;

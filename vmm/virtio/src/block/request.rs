//! Parsing and validation of virtio-blk requests.
//!
//! [`Request::parse`] is pure: it reads only the 16-byte request header from
//! guest memory and checks everything the handler relies on before any I/O:
//!
//! - the header is the first descriptor, driver-readable and exactly 16 bytes;
//! - the status is the last descriptor, device-writable and exactly 1 byte;
//! - data descriptors point the right way (device-writable for `IN` and
//!   `GET_ID`, driver-readable for `OUT`);
//! - every buffer lies inside guest RAM;
//! - `IN`/`OUT` lengths are whole sectors, at most [`MAX_REQUEST_BYTES`]
//!   in total, and `sector * 512 + len` neither overflows nor passes the end
//!   of the disk.

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use crate::chain::{walk_chain, ChainError, Desc};
use crate::GuestMemoryMmap;

/// Bytes per sector; the unit of the request header and of the capacity.
pub const SECTOR_SIZE: u64 = 512;
/// Largest data transfer of one request (4 MiB). Linux sends at most
/// `max_sectors_kb` (1280 KiB by default) per request; raising it past
/// 4096 in the guest makes larger requests fail with `IOERR`.
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;
/// Size of the request header (`struct virtio_blk_outhdr`).
pub const HEADER_LEN: u32 = 16;

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into the data buffers.
    In,
    /// Write the data buffers to sectors.
    Out,
    /// Make previous writes durable.
    Flush,
    /// Return the device serial (20 bytes).
    GetId,
    /// Any other type; answered with `VIRTIO_BLK_S_UNSUPP`.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            other => RequestType::Unsupported(other),
        }
    }
}

/// A validated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Request type.
    pub kind: RequestType,
    /// First sector (512-byte units) for `IN` and `OUT`.
    pub sector: u64,
    /// Data buffers, in order.
    pub data: Vec<Desc>,
    /// Total length of `data`.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain is not a valid request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The chain could not be walked.
    #[error("invalid descriptor chain")]
    Chain(#[source] ChainError),
    /// Fewer than two descriptors: no room for header and status.
    #[error("chain has no status descriptor")]
    MissingStatus,
    /// The last descriptor is not a 1-byte device-writable buffer.
    #[error("status descriptor is not 1 writable byte: {0:?}")]
    BadStatus(Desc),
    /// The first descriptor is not a 16-byte driver-readable buffer.
    #[error("header descriptor is not 16 readable bytes: {0:?}")]
    BadHeader(Desc),
    /// A buffer lies (partly) outside guest RAM.
    #[error("descriptor outside guest memory: {0:?}")]
    OutOfMemory(Desc),
    /// A data buffer points the wrong way for the request type.
    #[error("data descriptor has the wrong direction: {0:?}")]
    WrongDirection(Desc),
    /// The data is longer than [`MAX_REQUEST_BYTES`].
    #[error("request of {0} bytes is too large")]
    TooLarge(u64),
    /// The data length is not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    /// The transfer ends past the end of the disk (or overflows).
    #[error("sector {sector} + {len} bytes is past the disk end")]
    PastCapacity {
        /// First sector.
        sector: u64,
        /// Data length in bytes.
        len: u64,
    },
}

impl Request {
    /// Walks `chain` (at most `max_descriptors`) and validates it against a
    /// disk of `capacity` sectors.
    pub fn parse<M>(
        chain: DescriptorChain<M>,
        mem: &GuestMemoryMmap,
        capacity: u64,
        max_descriptors: usize,
    ) -> Result<Request, ParseError>
    where
        M: std::ops::Deref,
        M::Target: GuestMemory,
    {
        let mut descs = Vec::new();
        walk_chain(chain, max_descriptors, &mut descs).map_err(ParseError::Chain)?;
        Self::parse_descs(&descs, mem, capacity)
    }

    /// Validates an already walked chain.
    pub fn parse_descs(
        descs: &[Desc],
        mem: &GuestMemoryMmap,
        capacity: u64,
    ) -> Result<Request, ParseError> {
        let [header, data @ .., status] = descs else {
            return Err(ParseError::MissingStatus);
        };
        check_status(status, mem)?;
        let (kind, sector) = read_header(header, mem)?;
        let data_len = check_data(kind, data, mem)?;
        if matches!(kind, RequestType::In | RequestType::Out) {
            check_range(sector, data_len, capacity)?;
        }
        Ok(Request {
            kind,
            sector,
            data: data.to_vec(),
            data_len,
            status: status.addr,
        })
    }
}

fn check_status(status: &Desc, mem: &GuestMemoryMmap) -> Result<(), ParseError> {
    if !status.writable || status.len != 1 {
        return Err(ParseError::BadStatus(*status));
    }
    if !status.in_memory(mem) {
        return Err(ParseError::OutOfMemory(*status));
    }
    Ok(())
}

fn read_header(header: &Desc, mem: &GuestMemoryMmap) -> Result<(RequestType, u64), ParseError> {
    if header.writable || header.len != HEADER_LEN {
        return Err(ParseError::BadHeader(*header));
    }
    let out_of_memory = || ParseError::OutOfMemory(*header);
    let sector_addr = header.addr.checked_add(8).ok_or_else(out_of_memory)?;
    let kind: u32 = mem.read_obj(header.addr).map_err(|_| out_of_memory())?;
    let sector: u64 = mem.read_obj(sector_addr).map_err(|_| out_of_memory())?;
    Ok((RequestType::from(u32::from_le(kind)), u64::from_le(sector)))
}

fn check_data(kind: RequestType, data: &[Desc], mem: &GuestMemoryMmap) -> Result<u64, ParseError> {
    let want_writable = match kind {
        RequestType::In | RequestType::GetId => Some(true),
        RequestType::Out => Some(false),
        // Flush carries no data and unsupported requests are not executed:
        // their buffers are never touched.
        RequestType::Flush | RequestType::Unsupported(_) => None,
    };
    let mut total: u64 = 0;
    for desc in data {
        if want_writable.is_some_and(|w| w != desc.writable) {
            return Err(ParseError::WrongDirection(*desc));
        }
        if !desc.in_memory(mem) {
            return Err(ParseError::OutOfMemory(*desc));
        }
        total += u64::from(desc.len);
        if total > MAX_REQUEST_BYTES {
            return Err(ParseError::TooLarge(total));
        }
    }
    if matches!(kind, RequestType::In | RequestType::Out) && total & (SECTOR_SIZE - 1) != 0 {
        return Err(ParseError::Unaligned(total));
    }
    Ok(total)
}

fn check_range(sector: u64, len: u64, capacity: u64) -> Result<(), ParseError> {
    let end = sector
        .checked_mul(SECTOR_SIZE)
        .and_then(|start| start.checked_add(len));
    let capacity_bytes = capacity.saturating_mul(SECTOR_SIZE);
    match end {
        Some(end) if end <= capacity_bytes => Ok(()),
        _ => Err(ParseError::PastCapacity { sector, len }),
    }
}

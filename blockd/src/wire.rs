//! The replication wire protocol between a volume's primary and its backup
//! replicas, sans-IO: [`encode`] turns a [`Frame`] into bytes and [`decode`]
//! takes bytes off a stream, so every rule is unit-tested and fuzzed without
//! sockets.
//!
//! # Frame layout
//!
//! Every frame is a 44-byte fixed header, the volume id, then the payload.
//! Integers are little-endian.
//!
//! | bytes | field | meaning |
//! | --- | --- | --- |
//! | 0..4 | magic | `FBRP` |
//! | 4 | version | [`VERSION`] |
//! | 5 | kind | [`Kind`] |
//! | 6 | code | a [`NackCode`] in a `Nack`, the region shift in `Checksums` and `Sums`, zero otherwise |
//! | 7 | volume id length | 1..=[`MAX_VOLUME_ID`] |
//! | 8..16 | epoch | the sender's epoch of the volume |
//! | 16..24 | sequence | the request's number; a reply carries its request's |
//! | 24..32 | offset | byte offset (see each kind) |
//! | 32..36 | length | payload bytes; for `Read`, the bytes asked for |
//! | 36..40 | data CRC | CRC32C of the payload (0 when there is none) |
//! | 40..44 | header CRC | CRC32C of bytes 0..40 followed by the volume id |
//!
//! Kinds and their fields (an unused offset, length or code must be zero,
//! so a decoded frame encodes back to the very same bytes):
//!
//! - `Hello`: opens a connection; offset = the primary's capacity in bytes.
//! - `Write`: payload = data to write at offset.
//! - `Flush`: make every acknowledged write durable.
//! - `Read`: length = bytes to read at offset; no payload.
//! - `ReadData`: the answer to a `Read`: payload = the data read at offset.
//! - `Ack`: echoes its request's offset and length; answering `Hello`, the
//!   offset is the replica's capacity in bytes.
//! - `Nack`: code = why, offset = the epoch the refused request carried,
//!   payload = a UTF-8 message of at most [`MAX_MESSAGE`] bytes. The frame's
//!   epoch is the replica's own.
//! - `Checksums`: code = log2 of the region size ([`MIN_REGION_SHIFT`]..=
//!   [`MAX_REGION_SHIFT`]), length = bytes to checksum at offset; no
//!   payload. Asks for the CRC32C of each region of the range (the last
//!   one cut at the range's end), as resync compares copies.
//! - `Sums`: the answer to `Checksums`: code = its region shift, offset =
//!   its offset, payload = one little-endian CRC32C per region (length a
//!   multiple of 4).
//!
//! The header CRC covers the epoch, offset and length, so a flipped bit
//! cannot redirect a write; the data CRC covers the payload end to end.
//! Payloads are at most [`MAX_PAYLOAD`] bytes (the largest virtio-blk
//! request) and `offset + length` must not overflow.

/// `FBRP`: Ferrocloud block replication protocol.
pub const MAGIC: [u8; 4] = *b"FBRP";
/// The one version this build speaks.
pub const VERSION: u8 = 1;
/// Length of the fixed part of the header.
pub const HEADER_LEN: usize = 44;
/// Longest volume id.
pub const MAX_VOLUME_ID: usize = 64;
/// Largest payload, and largest `Read`.
pub const MAX_PAYLOAD: u32 = 4 << 20;
/// Longest `Nack` message.
pub const MAX_MESSAGE: usize = 1024;
/// Smallest `Checksums` region: one sector.
pub const MIN_REGION_SHIFT: u8 = 9;
/// Largest `Checksums` region: [`MAX_PAYLOAD`], so a region is copied in
/// one `Write`.
pub const MAX_REGION_SHIFT: u8 = 22;

/// CRC32C (Castagnoli), hardware-accelerated where the CPU has it.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// True for a volume id the wire (and a replica's file names) accept:
/// 1..=64 bytes of `[A-Za-z0-9._-]`, not starting with a dot.
pub fn valid_volume_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_VOLUME_ID
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The kind byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Opens a connection.
    Hello = 1,
    /// Data to write.
    Write = 2,
    /// Make writes durable.
    Flush = 3,
    /// Data asked for.
    Read = 4,
    /// Data answered.
    ReadData = 5,
    /// Done.
    Ack = 6,
    /// Refused.
    Nack = 7,
    /// Region checksums asked for.
    Checksums = 8,
    /// Region checksums answered.
    Sums = 9,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Write,
            3 => Kind::Flush,
            4 => Kind::Read,
            5 => Kind::ReadData,
            6 => Kind::Ack,
            7 => Kind::Nack,
            8 => Kind::Checksums,
            9 => Kind::Sums,
            _ => return None,
        })
    }
}

/// Why a replica refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum NackCode {
    /// The request's epoch is older than the replica's: its sender was
    /// fenced.
    Fenced = 1,
    /// The request's epoch is newer than any the configuration authority
    /// gave this replica.
    EpochAhead = 2,
    /// The replica holds no such volume.
    UnknownVolume = 3,
    /// The range passes the end of the volume.
    OutOfRange = 4,
    /// The replica's store failed.
    Io = 5,
    /// The frame could not be decoded, or is not a request.
    BadFrame = 6,
    /// The volume has no epoch yet (0): it takes no I/O until it gets one.
    Unconfigured = 7,
}

impl NackCode {
    fn from_byte(b: u8) -> Option<NackCode> {
        Some(match b {
            1 => NackCode::Fenced,
            2 => NackCode::EpochAhead,
            3 => NackCode::UnknownVolume,
            4 => NackCode::OutOfRange,
            5 => NackCode::Io,
            6 => NackCode::BadFrame,
            7 => NackCode::Unconfigured,
            _ => return None,
        })
    }
}

/// What a frame says, with the fields its kind uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// Opens a connection; `capacity` in bytes.
    Hello {
        /// The sender's volume capacity in bytes.
        capacity: u64,
    },
    /// Write `data` at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// The data.
        data: Vec<u8>,
    },
    /// Make every acknowledged write durable.
    Flush,
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Bytes asked for.
        len: u32,
    },
    /// The data read at `offset`.
    ReadData {
        /// Byte offset.
        offset: u64,
        /// The data.
        data: Vec<u8>,
    },
    /// The request was carried out.
    Ack {
        /// The request's offset (a replica's capacity answering `Hello`).
        offset: u64,
        /// The request's length.
        len: u32,
    },
    /// The request was refused.
    Nack {
        /// Why.
        code: NackCode,
        /// The epoch the refused request carried.
        request_epoch: u64,
        /// Details for the log.
        message: String,
    },
    /// The CRC32C of each `1 << region_shift`-byte region of `len` bytes
    /// at `offset`.
    Checksums {
        /// Byte offset.
        offset: u64,
        /// Bytes to checksum.
        len: u32,
        /// log2 of the region size.
        region_shift: u8,
    },
    /// The answer to `Checksums`.
    Sums {
        /// The request's offset.
        offset: u64,
        /// The request's region shift.
        region_shift: u8,
        /// One CRC32C per region, in order.
        sums: Vec<u32>,
    },
}

impl Body {
    /// The kind byte of this body.
    pub fn kind(&self) -> Kind {
        match self {
            Body::Hello { .. } => Kind::Hello,
            Body::Write { .. } => Kind::Write,
            Body::Flush => Kind::Flush,
            Body::Read { .. } => Kind::Read,
            Body::ReadData { .. } => Kind::ReadData,
            Body::Ack { .. } => Kind::Ack,
            Body::Nack { .. } => Kind::Nack,
            Body::Checksums { .. } => Kind::Checksums,
            Body::Sums { .. } => Kind::Sums,
        }
    }
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The volume it is about.
    pub volume: String,
    /// The sender's epoch of the volume.
    pub epoch: u64,
    /// The request's sequence number (a reply carries its request's).
    pub seq: u64,
    /// What it says.
    pub body: Body,
}

/// Why bytes are not a frame (or a frame cannot be encoded).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The first four bytes are not [`MAGIC`].
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// A version this build does not speak.
    #[error("unsupported version {0}")]
    BadVersion(u8),
    /// An unknown kind byte.
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    /// An unknown `Nack` code, or a code on another kind.
    #[error("bad code {code} in a {kind:?} frame")]
    BadCode {
        /// The kind.
        kind: Kind,
        /// The code byte.
        code: u8,
    },
    /// The volume id is empty, too long, or has characters outside
    /// `[A-Za-z0-9._-]`.
    #[error("bad volume id (must be 1 to 64 bytes of [A-Za-z0-9._-], no leading dot)")]
    BadVolumeId,
    /// The header CRC does not match.
    #[error("header CRC {actual:#010x}, expected {expected:#010x}")]
    HeaderCrc {
        /// Carried in the frame.
        expected: u32,
        /// Computed.
        actual: u32,
    },
    /// The payload (or `Read`) is longer than the protocol allows.
    #[error("length {len} is over the limit of {max} bytes")]
    TooLong {
        /// The length.
        len: u64,
        /// The limit for this kind.
        max: u64,
    },
    /// `offset + length` overflows.
    #[error("offset {offset} + length {len} overflows")]
    Overflow {
        /// The offset.
        offset: u64,
        /// The length.
        len: u32,
    },
    /// A field this kind does not use is not zero.
    #[error("{kind:?} frame has a non-zero {field}")]
    NonZero {
        /// The kind.
        kind: Kind,
        /// The field.
        field: &'static str,
    },
    /// The payload CRC does not match.
    #[error("data CRC {actual:#010x}, expected {expected:#010x}")]
    DataCrc {
        /// Carried in the frame.
        expected: u32,
        /// Computed.
        actual: u32,
    },
    /// A `Nack` message is not UTF-8.
    #[error("nack message is not UTF-8")]
    BadMessage,
    /// A `Sums` payload is not a whole number of checksums.
    #[error("sums payload of {0} bytes is not a multiple of 4")]
    BadSums(u32),
}

/// The header fields, once checked.
struct Header {
    kind: Kind,
    code: u8,
    volume_len: usize,
    epoch: u64,
    seq: u64,
    offset: u64,
    len: u32,
    data_crc: u32,
}

impl Header {
    /// Payload bytes that follow the header.
    fn payload_len(&self) -> usize {
        match self.kind {
            Kind::Write | Kind::ReadData | Kind::Nack | Kind::Sums => self.len as usize,
            _ => 0,
        }
    }

    fn total_len(&self) -> usize {
        HEADER_LEN + self.volume_len + self.payload_len()
    }
}

/// Encodes `frame`. Fails only for a frame no peer would accept: a bad
/// volume id, or a payload, read or message over its limit.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, WireError> {
    if !valid_volume_id(&frame.volume) {
        return Err(WireError::BadVolumeId);
    }
    let sums_bytes: Vec<u8>;
    let (code, offset, len, payload): (u8, u64, u32, &[u8]) = match &frame.body {
        Body::Hello { capacity } => (0, *capacity, 0, &[]),
        Body::Write { offset, data } | Body::ReadData { offset, data } => {
            (0, *offset, payload_len(data.len(), MAX_PAYLOAD)?, data)
        }
        Body::Flush => (0, 0, 0, &[]),
        Body::Read { offset, len } => (0, *offset, *len, &[]),
        Body::Ack { offset, len } => (0, *offset, *len, &[]),
        Body::Nack {
            code,
            request_epoch,
            message,
        } => {
            let len = payload_len(message.len(), MAX_MESSAGE as u32)?;
            (*code as u8, *request_epoch, len, message.as_bytes())
        }
        Body::Checksums {
            offset,
            len,
            region_shift,
        } => (
            check_shift(Kind::Checksums, *region_shift)?,
            *offset,
            *len,
            &[],
        ),
        Body::Sums {
            offset,
            region_shift,
            sums,
        } => {
            let code = check_shift(Kind::Sums, *region_shift)?;
            sums_bytes = sums.iter().flat_map(|s| s.to_le_bytes()).collect();
            let len = payload_len(sums_bytes.len(), MAX_PAYLOAD)?;
            (code, *offset, len, &sums_bytes)
        }
    };
    check_len(frame.body.kind(), offset, len)?;
    let mut out = Vec::with_capacity(HEADER_LEN + frame.volume.len() + payload.len());
    out.extend_from_slice(&MAGIC);
    // The volume id is at most 64 bytes (checked above).
    out.extend_from_slice(&[
        VERSION,
        frame.body.kind() as u8,
        code,
        frame.volume.len() as u8,
    ]);
    out.extend_from_slice(&frame.epoch.to_le_bytes());
    out.extend_from_slice(&frame.seq.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32c(payload).to_le_bytes());
    let header_crc = header_crc(&out, frame.volume.as_bytes());
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(frame.volume.as_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

fn payload_len(len: usize, max: u32) -> Result<u32, WireError> {
    u32::try_from(len)
        .ok()
        .filter(|l| *l <= max)
        .ok_or(WireError::TooLong {
            len: len as u64,
            max: u64::from(max),
        })
}

/// A region shift within [`MIN_REGION_SHIFT`]..=[`MAX_REGION_SHIFT`].
fn check_shift(kind: Kind, shift: u8) -> Result<u8, WireError> {
    if (MIN_REGION_SHIFT..=MAX_REGION_SHIFT).contains(&shift) {
        Ok(shift)
    } else {
        Err(WireError::BadCode { kind, code: shift })
    }
}

/// The header CRC: the first 40 header bytes, then the volume id.
fn header_crc(first40: &[u8], volume: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c(first40), volume)
}

/// Checks the length cap and that `offset + len` does not overflow.
fn check_len(kind: Kind, offset: u64, len: u32) -> Result<(), WireError> {
    let max = if kind == Kind::Nack {
        MAX_MESSAGE as u32
    } else {
        MAX_PAYLOAD
    };
    if len > max {
        return Err(WireError::TooLong {
            len: u64::from(len),
            max: u64::from(max),
        });
    }
    let uses_range = matches!(
        kind,
        Kind::Write | Kind::Read | Kind::ReadData | Kind::Ack | Kind::Checksums
    );
    if uses_range && offset.checked_add(u64::from(len)).is_none() {
        return Err(WireError::Overflow { offset, len });
    }
    Ok(())
}

/// Total length of the frame at the start of `buf` once its header is
/// complete (`Ok(None)` until then), checking everything but the payload.
/// A reader uses it to know how many more bytes to wait for.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    Ok(parse_header(buf)?.map(|h| h.total_len()))
}

/// Decodes the frame at the start of `buf`: `Ok(None)` while it is
/// incomplete, else the frame and the bytes it took. Errors come as soon as
/// the bytes seen so far cannot start a valid frame; a stream that gave one
/// cannot be resynchronised and should be closed.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
    let Some(h) = parse_header(buf)? else {
        return Ok(None);
    };
    let total = h.total_len();
    let Some(frame) = buf.get(..total) else {
        return Ok(None);
    };
    let volume_end = HEADER_LEN + h.volume_len;
    let payload = &frame[volume_end..];
    let actual = crc32c(payload);
    if actual != h.data_crc {
        return Err(WireError::DataCrc {
            expected: h.data_crc,
            actual,
        });
    }
    // The header check accepted the id's bytes, which are all ASCII.
    let volume = String::from_utf8_lossy(&frame[HEADER_LEN..volume_end]).into_owned();
    let body = body(&h, payload)?;
    let frame = Frame {
        volume,
        epoch: h.epoch,
        seq: h.seq,
        body,
    };
    Ok(Some((frame, total)))
}

/// Builds the body from a checked header and its payload.
fn body(h: &Header, payload: &[u8]) -> Result<Body, WireError> {
    Ok(match h.kind {
        Kind::Hello => Body::Hello { capacity: h.offset },
        Kind::Write => Body::Write {
            offset: h.offset,
            data: payload.to_vec(),
        },
        Kind::Flush => Body::Flush,
        Kind::Read => Body::Read {
            offset: h.offset,
            len: h.len,
        },
        Kind::ReadData => Body::ReadData {
            offset: h.offset,
            data: payload.to_vec(),
        },
        Kind::Ack => Body::Ack {
            offset: h.offset,
            len: h.len,
        },
        Kind::Nack => Body::Nack {
            code: NackCode::from_byte(h.code).ok_or(WireError::BadCode {
                kind: h.kind,
                code: h.code,
            })?,
            request_epoch: h.offset,
            message: String::from_utf8(payload.to_vec()).map_err(|_| WireError::BadMessage)?,
        },
        Kind::Checksums => Body::Checksums {
            offset: h.offset,
            len: h.len,
            region_shift: h.code,
        },
        Kind::Sums => Body::Sums {
            offset: h.offset,
            region_shift: h.code,
            sums: payload
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        },
    })
}

/// Parses and checks the header at the start of `buf`, failing as early as
/// the bytes present allow.
fn parse_header(buf: &[u8]) -> Result<Option<Header>, WireError> {
    if let Some(magic) = buf.get(..4) {
        if magic != MAGIC {
            let mut m = [0u8; 4];
            m.copy_from_slice(magic);
            return Err(WireError::BadMagic(m));
        }
    }
    if let Some(&v) = buf.get(4) {
        if v != VERSION {
            return Err(WireError::BadVersion(v));
        }
    }
    let kind = match buf.get(5) {
        Some(&k) => Kind::from_byte(k).ok_or(WireError::BadKind(k))?,
        None => return Ok(None),
    };
    let (Some(&code), Some(&volume_len)) = (buf.get(6), buf.get(7)) else {
        return Ok(None);
    };
    let volume_len = usize::from(volume_len);
    if volume_len == 0 || volume_len > MAX_VOLUME_ID {
        return Err(WireError::BadVolumeId);
    }
    let Some(header) = buf.get(..HEADER_LEN + volume_len) else {
        return Ok(None);
    };
    let volume = &header[HEADER_LEN..];
    let expected = le32(header, 40);
    let actual = header_crc(&header[..40], volume);
    if actual != expected {
        return Err(WireError::HeaderCrc { expected, actual });
    }
    if !std::str::from_utf8(volume).is_ok_and(valid_volume_id) {
        return Err(WireError::BadVolumeId);
    }
    let h = Header {
        kind,
        code,
        volume_len,
        epoch: le64(header, 8),
        seq: le64(header, 16),
        offset: le64(header, 24),
        len: le32(header, 32),
        data_crc: le32(header, 36),
    };
    check_fields(&h)?;
    Ok(Some(h))
}

/// Per-kind checks: limits, overflow and unused fields being zero.
fn check_fields(h: &Header) -> Result<(), WireError> {
    check_len(h.kind, h.offset, h.len)?;
    let nonzero = |field| WireError::NonZero {
        kind: h.kind,
        field,
    };
    let code_ok = match h.kind {
        Kind::Nack => NackCode::from_byte(h.code).is_some(),
        Kind::Checksums | Kind::Sums => check_shift(h.kind, h.code).is_ok(),
        _ => h.code == 0,
    };
    if !code_ok {
        return Err(WireError::BadCode {
            kind: h.kind,
            code: h.code,
        });
    }
    match h.kind {
        Kind::Hello if h.len != 0 => Err(nonzero("length")),
        Kind::Flush if h.offset != 0 => Err(nonzero("offset")),
        Kind::Flush if h.len != 0 => Err(nonzero("length")),
        Kind::Sums if !h.len.is_multiple_of(4) => Err(WireError::BadSums(h.len)),
        Kind::Read | Kind::Ack | Kind::Hello | Kind::Flush | Kind::Checksums if h.data_crc != 0 => {
            Err(nonzero("data CRC"))
        }
        _ => Ok(()),
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

#[cfg(test)]
mod tests;

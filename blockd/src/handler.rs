//! Executing one descriptor chain against a [`Store`]: copy the chain's
//! shape out of guest memory, [`decode`] it, check every buffer against
//! guest RAM, do the I/O and write the status byte.
//!
//! Nothing here knows vhost-user or epoll (that is `crate::backend`), so it
//! is tested by laying out chains in a `GuestMemoryMmap`.

use std::sync::Arc;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

use crate::request::{
    decode, header_fits, status_fits, DecodeError, Op, Segment, HEADER_LEN, ID_LEN, MAX_SEGMENTS,
    S_IOERR, S_OK,
};
use crate::store::Store;

/// Guest memory as the backend maps it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// One descriptor copied out of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Its shape, as the decoder sees it.
    pub seg: Segment,
}

/// Copies a chain's descriptors, stopping one past [`MAX_SEGMENTS`] so an
/// over-long chain is still seen as such by [`decode`].
pub fn collect<M>(chain: DescriptorChain<M>) -> Vec<Desc>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    chain
        .take(MAX_SEGMENTS + 1)
        .map(|d| Desc {
            addr: d.addr(),
            seg: Segment {
                len: d.len(),
                writable: d.is_write_only(),
            },
        })
        .collect()
}

/// Executes requests for one volume.
pub struct RequestHandler {
    store: Arc<dyn Store>,
    serial: [u8; ID_LEN],
}

impl RequestHandler {
    /// A handler over `store` answering `GET_ID` with `serial` (truncated
    /// to 20 bytes, NUL-padded).
    pub fn new(store: Arc<dyn Store>, serial: &str) -> Self {
        let mut id = [0u8; ID_LEN];
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        RequestHandler { store, serial: id }
    }

    /// Capacity of the volume in sectors.
    pub fn capacity(&self) -> u64 {
        self.store.capacity()
    }

    /// Executes the request in `descs` and returns the used length (0 when
    /// the status byte could not be written).
    pub fn handle(&self, mem: &GuestMemoryMmap, descs: &[Desc]) -> u32 {
        let segs: Vec<Segment> = descs.iter().map(|d| d.seg).collect();
        let (status, written) = match self.execute(mem, descs, &segs) {
            Ok(written) => (S_OK, written),
            Err(status) => (status, 0),
        };
        let Some(last) = descs.last().filter(|_| status_fits(&segs)) else {
            return 0;
        };
        if mem.write_slice(&[status], last.addr).is_err() {
            return 0;
        }
        written.saturating_add(1)
    }

    /// Runs the request; the bytes written into the chain, or the status.
    fn execute(&self, mem: &GuestMemoryMmap, descs: &[Desc], segs: &[Segment]) -> Result<u32, u8> {
        let header = read_header(mem, descs, segs);
        let request = decode(segs, header, self.capacity()).map_err(|e| trace(e).status())?;
        let data = &descs[request.data];
        if !data.iter().all(|d| in_memory(mem, d)) {
            return Err(S_IOERR);
        }
        match request.op {
            Op::Read { offset, len } => {
                let mut buf = vec![0u8; len as usize];
                self.store.read_at(&mut buf, offset).map_err(io_error)?;
                scatter(mem, data, &buf)
            }
            Op::Write { offset, len } => {
                let buf = gather(mem, data, len as usize)?;
                self.store.write_at(&buf, offset).map_err(io_error)?;
                Ok(0)
            }
            Op::Flush => self.store.flush().map(|()| 0).map_err(io_error),
            Op::GetId { len } => {
                let n = (len as usize).min(ID_LEN);
                scatter(mem, data, &self.serial[..n])
            }
        }
    }
}

fn trace(e: DecodeError) -> DecodeError {
    tracing::debug!(error = %e, "rejected virtio-blk request");
    e
}

fn io_error(e: std::io::Error) -> u8 {
    tracing::warn!(error = %e, "volume I/O failed");
    S_IOERR
}

fn in_memory(mem: &GuestMemoryMmap, d: &Desc) -> bool {
    d.seg.len == 0 || GuestMemoryBackend::check_range(mem, d.addr, d.seg.len as usize)
}

fn read_header(
    mem: &GuestMemoryMmap,
    descs: &[Desc],
    segs: &[Segment],
) -> Option<[u8; HEADER_LEN]> {
    if !header_fits(segs) {
        return None;
    }
    let mut header = [0u8; HEADER_LEN];
    mem.read_slice(&mut header, descs[0].addr).ok()?;
    Some(header)
}

/// Copies `buf` across the data descriptors, in order; returns its length.
fn scatter(mem: &GuestMemoryMmap, data: &[Desc], buf: &[u8]) -> Result<u32, u8> {
    let mut done = 0;
    for d in data {
        if done == buf.len() {
            break;
        }
        let n = (d.seg.len as usize).min(buf.len() - done);
        mem.write_slice(&buf[done..done + n], d.addr)
            .map_err(|_| S_IOERR)?;
        done += n;
    }
    Ok(done as u32)
}

/// Reads `len` bytes out of the data descriptors, in order.
fn gather(mem: &GuestMemoryMmap, data: &[Desc], len: usize) -> Result<Vec<u8>, u8> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    for d in data {
        let n = d.seg.len as usize;
        mem.read_slice(&mut buf[done..done + n], d.addr)
            .map_err(|_| S_IOERR)?;
        done += n;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests;

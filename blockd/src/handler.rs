//! Executing descriptor chains against a [`Store`]: copy each chain's
//! shape out of guest memory, [`decode`] it, check every buffer against
//! guest RAM, do the I/O and write the status byte. The chains of one pass
//! over the queue are one batch: their writes reach the store together
//! ([`RequestHandler::handle_batch`]).
//!
//! Nothing here knows vhost-user or epoll (that is `crate::backend`), so it
//! is tested by laying out chains in a `GuestMemoryMmap`.

use std::ops::Range;
use std::sync::Arc;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};

use crate::direct::AlignedBuf;
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
    /// The store's pass lock ([`Store::passes`]).
    pub fn passes(&self) -> Option<&std::sync::RwLock<()>> {
        self.store.passes()
    }

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
        let mut used = self.handle_batch(mem, &[descs.to_vec()]);
        used.pop().unwrap_or(0)
    }

    /// Executes the requests of one pass over the queue, `chains` in the
    /// order the driver made them available, and returns each one's used
    /// length. Writes are gathered and handed to the store together
    /// ([`Store::write_batch`]: a replicated store overlaps their round
    /// trips), and so are reads ([`Store::read_batch`]: a direct-I/O file
    /// has them in flight at once); each status is written only once the
    /// store says the request is done. The gathered writes go to the store
    /// first, as a barrier, before a `FLUSH` (which then covers them) and
    /// before a read that overlaps one of them (which then sees it); the
    /// gathered reads before a `FLUSH` and before a write that overlaps one
    /// of them (so they see the data from before it). `GET_ID` runs at
    /// once. Every status is written before this returns.
    pub fn handle_batch(&self, mem: &GuestMemoryMmap, chains: &[Vec<Desc>]) -> Vec<u32> {
        let mut used = vec![0; chains.len()];
        let mut writes = Vec::new();
        let mut reads: Vec<PendingRead> = Vec::new();
        for (i, descs) in chains.iter().enumerate() {
            let result = match self.prepare(mem, descs) {
                Ok(Prepared::Write { offset, data }) => {
                    if reads.iter().any(|r| r.overlaps(offset, data.len() as u64)) {
                        self.submit_reads(mem, chains, &mut reads, &mut used);
                    }
                    if pending_bytes(&writes) + data.len() > MAX_BATCH_BYTES {
                        self.submit(mem, chains, &mut writes, &mut used);
                    }
                    writes.push(PendingWrite {
                        index: i,
                        offset,
                        data,
                    });
                    continue;
                }
                Ok(Prepared::Now { op, data }) => {
                    if op == Op::Flush {
                        self.submit_reads(mem, chains, &mut reads, &mut used);
                    }
                    if waits_for(op, &writes) {
                        self.submit(mem, chains, &mut writes, &mut used);
                    }
                    if let Op::Read { offset, len } = op {
                        reads.push(PendingRead {
                            index: i,
                            offset,
                            len,
                            data,
                        });
                        continue;
                    }
                    self.run(mem, &descs[data], op)
                }
                Err(status) => Err(status),
            };
            used[i] = complete(mem, descs, result);
        }
        self.submit_reads(mem, chains, &mut reads, &mut used);
        self.submit(mem, chains, &mut writes, &mut used);
        used
    }

    /// Hands the gathered `reads` to the store together and completes
    /// each.
    fn submit_reads(
        &self,
        mem: &GuestMemoryMmap,
        chains: &[Vec<Desc>],
        reads: &mut Vec<PendingRead>,
        used: &mut [u32],
    ) {
        if reads.is_empty() {
            return;
        }
        let bufs: Vec<Result<Vec<vm_memory::VolatileSlice<'_>>, u8>> = reads
            .iter()
            .map(|r| guest_buffers(mem, &chains[r.index][r.data.clone()]))
            .collect();
        let batch: Vec<(u64, &[vm_memory::VolatileSlice<'_>])> = reads
            .iter()
            .zip(&bufs)
            .filter_map(|(r, b)| b.as_ref().ok().map(|b| (r.offset, &b[..])))
            .collect();
        let mut results = self.store.read_batch(&batch).into_iter();
        for (r, b) in reads.drain(..).zip(&bufs) {
            let result = match b {
                Err(status) => Err(*status),
                Ok(_) => results
                    .next()
                    .unwrap_or_else(|| {
                        Err(std::io::Error::other("the store left a read unanswered"))
                    })
                    .map_err(io_error)
                    .and_then(|()| u32::try_from(r.len).map_err(|_| S_IOERR)),
            };
            used[r.index] = complete(mem, &chains[r.index], result);
        }
    }

    /// Hands the gathered `writes` to the store and completes each.
    fn submit(
        &self,
        mem: &GuestMemoryMmap,
        chains: &[Vec<Desc>],
        writes: &mut Vec<PendingWrite>,
        used: &mut [u32],
    ) {
        if writes.is_empty() {
            return;
        }
        let batch: Vec<(u64, &[u8])> = writes.iter().map(|w| (w.offset, &w.data[..])).collect();
        let mut results = self.store.write_batch(&batch).into_iter();
        for w in writes.drain(..) {
            let result = results
                .next()
                .unwrap_or_else(|| Err(std::io::Error::other("the store left a write unanswered")));
            let result = result.map(|()| 0).map_err(io_error);
            used[w.index] = complete(mem, &chains[w.index], result);
        }
    }

    /// Decodes the request in `descs`, checks its buffers against guest
    /// memory, and copies a write's data out; the status if it is refused.
    fn prepare(&self, mem: &GuestMemoryMmap, descs: &[Desc]) -> Result<Prepared, u8> {
        let segs: Vec<Segment> = descs.iter().map(|d| d.seg).collect();
        let header = read_header(mem, descs, &segs);
        let request = decode(&segs, header, self.capacity()).map_err(|e| trace(e).status())?;
        let data = &descs[request.data.clone()];
        if !data.iter().all(|d| in_memory(mem, d)) {
            return Err(S_IOERR);
        }
        Ok(match request.op {
            Op::Write { offset, len } => Prepared::Write {
                offset,
                data: gather(mem, data, len as usize)?,
            },
            op => Prepared::Now {
                op,
                data: request.data,
            },
        })
    }

    /// Runs `op` over its `data` descriptors now; the bytes written into
    /// the chain, or the status.
    fn run(&self, mem: &GuestMemoryMmap, data: &[Desc], op: Op) -> Result<u32, u8> {
        match op {
            Op::Read { offset, len } => {
                let bufs = guest_buffers(mem, data)?;
                self.store.read_into(&bufs, offset).map_err(io_error)?;
                u32::try_from(len).map_err(|_| S_IOERR)
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

/// Bytes of write data one batch gathers out of guest memory before it
/// hands them to the store (a queue pass can hold up to 1 GiB of writes).
const MAX_BATCH_BYTES: usize = 16 << 20;

/// A request decoded and checked, not yet carried out.
enum Prepared {
    /// A write, its data copied out of guest memory (into a buffer direct
    /// I/O can take as it is).
    Write { offset: u64, data: AlignedBuf },
    /// Any other request (not a write), and the indices of its data
    /// descriptors.
    Now { op: Op, data: Range<usize> },
}

/// True if `op` must wait for the gathered `writes` to be done: a flush
/// (it makes them durable), or a read of a sector one of them writes.
fn waits_for(op: Op, writes: &[PendingWrite]) -> bool {
    match op {
        Op::Flush => true,
        Op::Read { offset, len } => writes.iter().any(|w| w.overlaps(offset, len)),
        Op::Write { .. } | Op::GetId { .. } => false,
    }
}

/// A read gathered into the batch, not handed to the store yet.
struct PendingRead {
    /// Its chain's index in the batch.
    index: usize,
    offset: u64,
    len: u64,
    /// Its data descriptors.
    data: Range<usize>,
}

impl PendingRead {
    fn overlaps(&self, offset: u64, len: u64) -> bool {
        offset < self.offset + self.len && self.offset < offset + len
    }
}

/// A write gathered into the batch, not handed to the store yet.
struct PendingWrite {
    /// Its chain's index in the batch.
    index: usize,
    offset: u64,
    data: AlignedBuf,
}

impl PendingWrite {
    fn overlaps(&self, offset: u64, len: u64) -> bool {
        offset < self.offset + self.data.len() as u64 && self.offset < offset + len
    }
}

fn pending_bytes(writes: &[PendingWrite]) -> usize {
    writes.iter().map(|w| w.data.len()).sum()
}

/// Writes the status byte for `result` into the chain's last descriptor;
/// the used length (0 when the status could not be written).
fn complete(mem: &GuestMemoryMmap, descs: &[Desc], result: Result<u32, u8>) -> u32 {
    let (status, written) = match result {
        Ok(written) => (S_OK, written),
        Err(status) => (status, 0),
    };
    let fits = status_fits(&descs.iter().map(|d| d.seg).collect::<Vec<_>>());
    let Some(last) = descs.last().filter(|_| fits) else {
        return 0;
    };
    if mem.write_slice(&[status], last.addr).is_err() {
        return 0;
    }
    written.saturating_add(1)
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

/// The guest memory of the data descriptors, in order (a descriptor that
/// spans two memory regions gives a slice of each).
fn guest_buffers<'m>(
    mem: &'m GuestMemoryMmap,
    data: &[Desc],
) -> Result<Vec<vm_memory::VolatileSlice<'m>>, u8> {
    let mut bufs = Vec::with_capacity(data.len());
    for d in data {
        for slice in GuestMemoryBackend::get_slices(mem, d.addr, d.seg.len as usize) {
            bufs.push(slice.map_err(|_| S_IOERR)?);
        }
    }
    Ok(bufs)
}

/// Reads `len` bytes out of the data descriptors, in order.
fn gather(mem: &GuestMemoryMmap, data: &[Desc], len: usize) -> Result<AlignedBuf, u8> {
    let mut buf = AlignedBuf::zeroed(len);
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

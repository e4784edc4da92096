//! The virtio-blk queue logic: parse each chain, run it against the disk,
//! write the status byte and return the chain.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::Bytes;

use super::disk::Disk;
use super::request::{ParseError, Request, RequestType, SECTOR_SIZE};
use super::MAX_DESCRIPTORS;
use crate::chain::{drain_queue, walk_chain, Desc, QueueError};
use crate::ratelimit::LogRateLimiter;
use crate::worker::QueueProcessor;
use crate::GuestMemoryMmap;

/// Counters of a block device.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Chains processed (valid or not).
    pub requests: AtomicU64,
    /// Bytes read from the disk into the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written from the guest to the disk.
    pub write_bytes: AtomicU64,
    /// Flush requests.
    pub flushes: AtomicU64,
    /// Malformed chains and failed I/O.
    pub errors: AtomicU64,
    /// Requests of an unsupported type.
    pub unsupported: AtomicU64,
}

/// Executes virtio-blk requests against a [`Disk`].
pub struct BlockHandler {
    disk: Arc<Disk>,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    metrics: Arc<BlockMetrics>,
    limiter: Arc<LogRateLimiter>,
    descs: Vec<Desc>,
}

impl BlockHandler {
    /// A handler for `disk` answering `GET_ID` with `serial` (truncated to
    /// 20 bytes, zero padded).
    pub fn new(disk: Arc<Disk>, serial: &str, metrics: Arc<BlockMetrics>) -> Self {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = serial.len().min(id.len());
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        BlockHandler {
            disk,
            serial: id,
            metrics,
            limiter: Arc::default(),
            descs: Vec::with_capacity(MAX_DESCRIPTORS),
        }
    }

    /// Processes one chain; returns the used length to report.
    pub fn process_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let parsed = walk_chain(chain, MAX_DESCRIPTORS, &mut self.descs)
            .map_err(ParseError::Chain)
            .and_then(|()| Request::parse_descs(&self.descs, mem, self.disk.capacity()));
        match parsed {
            Ok(request) => self.complete(mem, &request),
            Err(e) => self.reject(mem, e),
        }
    }

    fn complete(&mut self, mem: &GuestMemoryMmap, request: &Request) -> u32 {
        let (status, written) = self.execute(mem, request);
        if mem.write_obj(status, request.status).is_err() {
            // Validated by the parser; only a memory unplug gets here.
            self.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        // `written` is at most MAX_REQUEST_BYTES.
        written as u32 + 1
    }

    /// Runs a valid request; returns the status and the bytes written into
    /// the guest's data buffers.
    fn execute(&mut self, mem: &GuestMemoryMmap, request: &Request) -> (u8, u64) {
        let result = match request.kind {
            RequestType::In => self.read(mem, request).map(|()| request.data_len),
            RequestType::Out => self.write(mem, request).map(|()| 0),
            RequestType::Flush => self.flush().map(|()| 0),
            RequestType::GetId => Ok(self.get_id(mem, request)),
            RequestType::Unsupported(kind) => {
                self.metrics.unsupported.fetch_add(1, Ordering::Relaxed);
                crate::warn_ratelimited!(self.limiter, kind, "unsupported block request");
                return (VIRTIO_BLK_S_UNSUPP as u8, 0);
            }
        };
        match result {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
            Err(e) => {
                self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                crate::warn_ratelimited!(self.limiter, error = %e, kind = ?request.kind, sector = request.sector, "block I/O failed");
                (VIRTIO_BLK_S_IOERR as u8, 0)
            }
        }
    }

    fn read(&self, mem: &GuestMemoryMmap, request: &Request) -> std::io::Result<()> {
        let mut offset = request.sector * SECTOR_SIZE;
        for desc in &request.data {
            self.disk
                .read_to_guest(mem, desc.addr, desc.len as usize, offset)?;
            offset += u64::from(desc.len);
        }
        self.metrics
            .read_bytes
            .fetch_add(request.data_len, Ordering::Relaxed);
        Ok(())
    }

    fn write(&self, mem: &GuestMemoryMmap, request: &Request) -> std::io::Result<()> {
        let mut offset = request.sector * SECTOR_SIZE;
        for desc in &request.data {
            self.disk
                .write_from_guest(mem, desc.addr, desc.len as usize, offset)?;
            offset += u64::from(desc.len);
        }
        self.metrics
            .write_bytes
            .fetch_add(request.data_len, Ordering::Relaxed);
        Ok(())
    }

    fn flush(&self) -> std::io::Result<()> {
        self.metrics.flushes.fetch_add(1, Ordering::Relaxed);
        self.disk.flush()
    }

    /// Copies the serial into the data buffers; returns the bytes copied.
    fn get_id(&self, mem: &GuestMemoryMmap, request: &Request) -> u64 {
        let mut copied = 0;
        for desc in &request.data {
            let rest = &self.serial[copied..];
            let n = rest.len().min(desc.len as usize);
            if n == 0 || mem.write_slice(&rest[..n], desc.addr).is_err() {
                break;
            }
            copied += n;
        }
        copied as u64
    }

    /// Answers a malformed chain: `IOERR` in its last descriptor if that can
    /// hold a status byte, otherwise a used entry of length 0.
    fn reject(&mut self, mem: &GuestMemoryMmap, error: ParseError) -> u32 {
        self.metrics.errors.fetch_add(1, Ordering::Relaxed);
        crate::warn_ratelimited!(self.limiter, error = %error, "malformed block request");
        let status = match error {
            ParseError::Chain(_) => None,
            _ => self.descs.last().filter(|d| d.writable && d.len >= 1),
        };
        match status {
            Some(desc) if mem.write_obj(VIRTIO_BLK_S_IOERR as u8, desc.addr).is_ok() => 1,
            _ => 0,
        }
    }
}

impl QueueProcessor for BlockHandler {
    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, QueueError> {
        let limiter = self.limiter.clone();
        drain_queue(queue, mem, &limiter, |chain| self.process_chain(mem, chain))
    }
}

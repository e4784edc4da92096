//! Walking descriptor chains and draining queues, shared by all devices.
//!
//! virtio-queue's chain iterator already bounds a chain: it stops after
//! `queue size` descriptors (so a loop in the `next` fields ends), after an
//! unreadable descriptor, on a nested indirect table, and when the chain's
//! total length would pass 4 GiB. [`walk_chain`] adds a per-device cap on the
//! descriptor count and [`Desc::in_memory`] checks each buffer against guest
//! RAM before a device touches it.

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryBackend};

use crate::ratelimit::LogRateLimiter;
use crate::GuestMemoryMmap;

/// One descriptor of a chain, copied out of guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address of the buffer.
    pub addr: GuestAddress,
    /// Length of the buffer in bytes.
    pub len: u32,
    /// Whether the device may write the buffer (`VRING_DESC_F_WRITE`).
    pub writable: bool,
}

impl Desc {
    /// True if the whole buffer lies inside guest RAM. Empty buffers are
    /// accepted: nothing is ever accessed through them.
    pub fn in_memory(&self, mem: &GuestMemoryMmap) -> bool {
        self.len == 0 || GuestMemoryBackend::check_range(mem, self.addr, self.len as usize)
    }
}

/// Errors walking a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The chain holds more descriptors than the device accepts.
    #[error("chain longer than {max} descriptors")]
    TooLong {
        /// The device's limit.
        max: usize,
    },
}

/// Errors from the queue itself (its rings are no longer in guest memory).
#[derive(Debug, thiserror::Error)]
#[error("virtqueue access failed")]
pub struct QueueError(#[source] pub virtio_queue::Error);

impl From<virtio_queue::Error> for QueueError {
    fn from(e: virtio_queue::Error) -> Self {
        QueueError(e)
    }
}

/// Copies the descriptors of `chain` into `out` (cleared first), failing if
/// there are more than `max`.
pub fn walk_chain<M>(
    chain: DescriptorChain<M>,
    max: usize,
    out: &mut Vec<Desc>,
) -> Result<(), ChainError>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    out.clear();
    for desc in chain {
        if out.len() == max {
            return Err(ChainError::TooLong { max });
        }
        out.push(Desc {
            addr: desc.addr(),
            len: desc.len(),
            writable: desc.is_write_only(),
        });
    }
    Ok(())
}

/// Pops every available chain of `queue`, hands it to `process` (which
/// returns the number of bytes written into the chain) and adds it to the
/// used ring. Notifications from the driver are suppressed while draining.
///
/// Returns whether the driver must be interrupted.
pub fn drain_queue<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    limiter: &LogRateLimiter,
    mut process: F,
) -> Result<bool, QueueError>
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    let mut used = false;
    loop {
        queue.disable_notification(mem)?;
        let mut popped = 0usize;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = process(chain);
            add_used(queue, mem, limiter, head, len);
            popped += 1;
        }
        used |= popped > 0;
        // A corrupt avail index makes `enable_notification` report work that
        // `pop_descriptor_chain` refuses to return: stop instead of spinning.
        if !queue.enable_notification(mem)? || popped == 0 {
            break;
        }
    }
    Ok(used && queue.needs_notification(mem)?)
}

/// Adds `head` to the used ring, logging (rate-limited) a head index the
/// driver made up.
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    limiter: &LogRateLimiter,
    head: u16,
    len: u32,
) {
    if let Err(e) = queue.add_used(mem, head, len) {
        crate::warn_ratelimited!(limiter, head, error = %e, "cannot add chain to used ring");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn walks_and_caps_chains() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 16);
        let descs: Vec<RawDescriptor> = (0..3)
            .map(|i| {
                let flags = if i == 2 { VRING_DESC_F_WRITE } else { 0 };
                Descriptor::new(0x1000 * (i + 1), 16, flags as u16, 0).into()
            })
            .collect();
        let chain = vq.build_desc_chain(&descs).unwrap();
        let mut out = Vec::new();
        walk_chain(chain.clone(), 3, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert!(!out[0].writable && out[2].writable);
        assert_eq!(out[1].addr, GuestAddress(0x2000));
        assert_eq!(
            walk_chain(chain, 2, &mut out),
            Err(ChainError::TooLong { max: 2 })
        );
    }

    #[test]
    fn looping_chain_terminates() {
        let mem = mem();
        let vq = MockSplitQueue::new(&mem, 4);
        // 0 -> 1 -> 0 -> ...
        let descs: Vec<RawDescriptor> = vec![
            Descriptor::new(0x1000, 8, VRING_DESC_F_NEXT as u16, 1).into(),
            Descriptor::new(0x2000, 8, VRING_DESC_F_NEXT as u16, 0).into(),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        let mut out = Vec::new();
        walk_chain(chain, 1024, &mut out).unwrap();
        assert_eq!(out.len(), 4, "bounded by the queue size");
    }

    #[test]
    fn out_of_memory_descriptor_detected() {
        let mem = mem();
        let inside = Desc {
            addr: GuestAddress(0xf_f000),
            len: 0x1000,
            writable: false,
        };
        let straddling = Desc {
            len: 0x1001,
            ..inside
        };
        let wrapping = Desc {
            addr: GuestAddress(u64::MAX - 1),
            len: 16,
            writable: true,
        };
        assert!(inside.in_memory(&mem));
        assert!(!straddling.in_memory(&mem));
        assert!(!wrapping.in_memory(&mem));
    }
}

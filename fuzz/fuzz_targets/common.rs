//! Shared setup: the fuzz input becomes the start of guest memory, which
//! holds a 16-entry split queue (descriptor table at 0, avail ring at 0x100,
//! used ring at 0x200) and whatever buffers the descriptors point at.

use ferro_virtio::testing::guest_memory;
use ferro_virtio::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};
use virtio_queue::{Queue, QueueT};

/// Guest RAM size; descriptors may point anywhere, including past it.
pub const MEM_SIZE: usize = 0x1_0000;
pub const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;

/// Guest memory holding `data` at address 0, and a ready queue over it.
pub fn setup(data: &[u8]) -> (GuestMemoryMmap, Queue) {
    let mem = guest_memory(MEM_SIZE);
    let n = data.len().min(MEM_SIZE);
    mem.write_slice(&data[..n], GuestAddress(0)).unwrap();
    // Keep the used ring's index sane so the harness state is meaningful.
    mem.write_obj(0u16, GuestAddress(USED + 2)).unwrap();
    let mut queue = Queue::new(QUEUE_SIZE).unwrap();
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(USED as u32), Some(0));
    queue.set_ready(true);
    // Event idx on or off, chosen by the input.
    queue.set_event_idx(data.first().is_some_and(|b| b & 1 == 1));
    (mem, queue)
}

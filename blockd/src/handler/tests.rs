use std::sync::Mutex;

use super::*;
use crate::request::{SECTOR_SIZE, S_UNSUPP};

/// A volume in a Vec, counting flushes and logging what it was asked.
struct MemStore {
    data: Mutex<Vec<u8>>,
    flushes: Mutex<u32>,
    calls: Mutex<Vec<Call>>,
    /// A write at this offset fails.
    fail_at: Option<u64>,
}

/// A store call, with the byte offsets it touched.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Call {
    Read(u64),
    Batch(Vec<u64>),
    Flush,
}

impl Store for MemStore {
    fn capacity(&self) -> u64 {
        self.data.lock().unwrap().len() as u64 / SECTOR_SIZE
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.calls.lock().unwrap().push(Call::Read(offset));
        let o = offset as usize;
        buf.copy_from_slice(&self.data.lock().unwrap()[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if self.fail_at == Some(offset) {
            return Err(std::io::Error::other("disk on fire"));
        }
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Vec<std::io::Result<()>> {
        let offsets = writes.iter().map(|w| w.0).collect();
        self.calls.lock().unwrap().push(Call::Batch(offsets));
        writes.iter().map(|&(o, d)| self.write_at(d, o)).collect()
    }
    fn flush(&self) -> std::io::Result<()> {
        self.calls.lock().unwrap().push(Call::Flush);
        *self.flushes.lock().unwrap() += 1;
        Ok(())
    }
}

const MEM: u64 = 0x10_0000;
const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0x8000;

fn setup() -> (RequestHandler, Arc<MemStore>, GuestMemoryMmap) {
    setup_failing(None)
}

fn setup_failing(fail_at: Option<u64>) -> (RequestHandler, Arc<MemStore>, GuestMemoryMmap) {
    let store = Arc::new(MemStore {
        data: Mutex::new((0..64 * 1024).map(|i| (i % 251) as u8).collect()),
        flushes: Mutex::new(0),
        calls: Mutex::new(Vec::new()),
        fail_at,
    });
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    (RequestHandler::new(store.clone(), "vol-1"), store, mem)
}

fn desc(addr: u64, len: u32, writable: bool) -> Desc {
    Desc {
        addr: GuestAddress(addr),
        seg: Segment { len, writable },
    }
}

fn request(mem: &GuestMemoryMmap, kind: u32, sector: u64, data: &[Desc]) -> Vec<Desc> {
    mem.write_obj(kind, GuestAddress(HDR)).unwrap();
    mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let mut descs = vec![desc(HDR, 16, false)];
    descs.extend_from_slice(data);
    descs.push(desc(STATUS, 1, true));
    descs
}

fn status(mem: &GuestMemoryMmap) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

#[test]
fn read_scatters_into_two_buffers() {
    let (h, store, mem) = setup();
    let descs = request(
        &mem,
        0,
        2,
        &[desc(DATA, 512, true), desc(DATA + 0x1000, 512, true)],
    );
    assert_eq!(h.handle(&mem, &descs), 1025);
    assert_eq!(status(&mem), S_OK);
    let mut got = vec![0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(got[..], store.data.lock().unwrap()[1536..2048]);
}

#[test]
fn write_then_flush_reach_the_store() {
    let (h, store, mem) = setup();
    mem.write_slice(&[0xab; 1024], GuestAddress(DATA)).unwrap();
    let descs = request(&mem, 1, 4, &[desc(DATA, 1024, false)]);
    assert_eq!(h.handle(&mem, &descs), 1);
    assert_eq!(status(&mem), S_OK);
    assert!(store.data.lock().unwrap()[2048..3072]
        .iter()
        .all(|b| *b == 0xab));
    let descs = request(&mem, 4, 0, &[]);
    assert_eq!(h.handle(&mem, &descs), 1);
    assert_eq!(*store.flushes.lock().unwrap(), 1);
}

#[test]
fn get_id_is_the_serial_nul_padded() {
    let (h, _, mem) = setup();
    let descs = request(&mem, 8, 0, &[desc(DATA, 20, true)]);
    assert_eq!(h.handle(&mem, &descs), 21);
    let mut id = [0xffu8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..6], b"vol-1\0");
}

#[test]
fn bad_requests_get_ioerr_or_unsupp_and_no_io() {
    let (h, store, mem) = setup();
    let before = store.data.lock().unwrap().clone();
    // Past the end of the 64 KiB volume.
    let descs = request(&mem, 1, 128, &[desc(DATA, 512, false)]);
    assert_eq!(h.handle(&mem, &descs), 1);
    assert_eq!(status(&mem), S_IOERR);
    // A data buffer outside guest memory.
    let descs = request(&mem, 1, 0, &[desc(MEM - 256, 512, false)]);
    assert_eq!(h.handle(&mem, &descs), 1);
    assert_eq!(status(&mem), S_IOERR);
    // Unknown type.
    let descs = request(&mem, 99, 0, &[]);
    h.handle(&mem, &descs);
    assert_eq!(status(&mem), S_UNSUPP);
    assert_eq!(*store.data.lock().unwrap(), before);
}

#[test]
fn status_outside_memory_or_missing_is_length_zero() {
    let (h, _, mem) = setup();
    let mut descs = request(&mem, 0, 0, &[desc(DATA, 512, true)]);
    descs.last_mut().unwrap().addr = GuestAddress(MEM + 4096);
    assert_eq!(h.handle(&mem, &descs), 0);
    assert_eq!(h.handle(&mem, &[]), 0);
    assert_eq!(h.handle(&mem, &[desc(HDR, 16, false)]), 0);
    // A header outside memory is answered through the status.
    let mut descs = request(&mem, 0, 0, &[desc(DATA, 512, true)]);
    descs[0].addr = GuestAddress(u64::MAX - 8);
    assert_eq!(h.handle(&mem, &descs), 1);
    assert_eq!(status(&mem), S_IOERR);
}

/// Request `slot` of a batch, laid out at its own addresses: header, data
/// (`len` bytes, device-writable for a read), status.
fn slot_request(mem: &GuestMemoryMmap, slot: u64, kind: u32, sector: u64, len: u32) -> Vec<Desc> {
    let base = 0x1_0000 + slot * 0x2000;
    mem.write_obj(kind, GuestAddress(base)).unwrap();
    mem.write_obj(sector, GuestAddress(base + 8)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(base + 0x10)).unwrap();
    let mut descs = vec![desc(base, 16, false)];
    if len > 0 {
        descs.push(desc(base + 0x1000, len, kind != 1));
    }
    descs.push(desc(base + 0x10, 1, true));
    descs
}

fn slot_data(slot: u64) -> GuestAddress {
    GuestAddress(0x1_0000 + slot * 0x2000 + 0x1000)
}

fn slot_status(mem: &GuestMemoryMmap, slot: u64) -> u8 {
    mem.read_obj(GuestAddress(0x1_0000 + slot * 0x2000 + 0x10))
        .unwrap()
}

#[test]
fn a_pass_hands_its_writes_to_the_store_together_and_a_flush_is_a_barrier() {
    let (h, store, mem) = setup();
    let (read, write, flush, get_id) = (0, 1, 4, 8);
    let chains = vec![
        slot_request(&mem, 0, write, 0, 4096),
        slot_request(&mem, 1, write, 8, 4096),
        // Touches no pending write: joins the pass's reads, which go to
        // the store before the flush.
        slot_request(&mem, 2, read, 64, 512),
        slot_request(&mem, 3, get_id, 0, 20),
        slot_request(&mem, 4, write, 16, 4096),
        // Every write before it is done first.
        slot_request(&mem, 5, flush, 0, 0),
        slot_request(&mem, 6, write, 24, 4096),
    ];
    let used = h.handle_batch(&mem, &chains);
    assert_eq!(used, vec![1, 1, 513, 21, 1, 1, 1]);
    assert!((0..7).all(|slot| slot_status(&mem, slot) == S_OK));
    assert_eq!(
        *store.calls.lock().unwrap(),
        vec![
            Call::Read(64 * 512),
            Call::Batch(vec![0, 4096, 8192]),
            Call::Flush,
            Call::Batch(vec![12288]),
        ]
    );
}

#[test]
fn a_read_of_a_sector_written_earlier_in_the_pass_sees_the_write() {
    let (h, store, mem) = setup();
    mem.write_slice(&[0xaa; 4096], slot_data(0)).unwrap();
    let chains = vec![
        slot_request(&mem, 0, 1, 0, 4096),
        // Sectors 4..5 lie inside the write of sectors 0..7.
        slot_request(&mem, 1, 0, 4, 1024),
        slot_request(&mem, 2, 1, 8, 512),
    ];
    assert_eq!(h.handle_batch(&mem, &chains), vec![1, 1025, 1]);
    let mut got = vec![0u8; 1024];
    mem.read_slice(&mut got, slot_data(1)).unwrap();
    assert_eq!(got, vec![0xaa; 1024]);
    assert_eq!(
        *store.calls.lock().unwrap(),
        vec![
            Call::Batch(vec![0]),
            Call::Read(2048),
            Call::Batch(vec![4096])
        ]
    );
}

#[test]
fn a_write_that_fails_in_a_batch_fails_alone() {
    let (h, _, mem) = setup_failing(Some(4096));
    let chains: Vec<Vec<Desc>> = (0..3)
        .map(|slot| slot_request(&mem, slot, 1, slot * 8, 4096))
        .collect();
    assert_eq!(h.handle_batch(&mem, &chains), vec![1, 1, 1]);
    let statuses: Vec<u8> = (0..3).map(|slot| slot_status(&mem, slot)).collect();
    assert_eq!(statuses, vec![S_OK, S_IOERR, S_OK]);
}

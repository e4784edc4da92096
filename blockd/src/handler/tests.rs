use std::sync::Mutex;

use super::*;
use crate::request::{SECTOR_SIZE, S_UNSUPP};

/// A volume in a Vec, counting flushes.
struct MemStore {
    data: Mutex<Vec<u8>>,
    flushes: Mutex<u32>,
}

impl Store for MemStore {
    fn capacity(&self) -> u64 {
        self.data.lock().unwrap().len() as u64 / SECTOR_SIZE
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let o = offset as usize;
        buf.copy_from_slice(&self.data.lock().unwrap()[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        *self.flushes.lock().unwrap() += 1;
        Ok(())
    }
}

const MEM: u64 = 0x10_0000;
const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0x8000;

fn setup() -> (RequestHandler, Arc<MemStore>, GuestMemoryMmap) {
    let store = Arc::new(MemStore {
        data: Mutex::new((0..64 * 1024).map(|i| (i % 251) as u8).collect()),
        flushes: Mutex::new(0),
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

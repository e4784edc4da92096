//! virtio-blk without a guest: chains pushed through `MockSplitQueue`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::testing::{guest_memory, TempImage};
use crate::worker::QueueProcessor;

const SECTORS: u64 = 64;
const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0x9000;
const W: u16 = VRING_DESC_F_WRITE as u16;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

struct Fixture {
    mem: GuestMemoryMmap,
    image: TempImage,
    handler: BlockHandler,
    metrics: Arc<BlockMetrics>,
}

impl Fixture {
    fn new(read_only: bool) -> Self {
        let image = TempImage::new("blk", &pattern(SECTORS as usize * 512)).unwrap();
        let disk = Disk::open(image.path(), read_only).unwrap();
        let metrics = Arc::new(BlockMetrics::default());
        let handler = BlockHandler::new(
            Arc::new(disk),
            "serial-0123456789abcdefXYZ",
            metrics.clone(),
        );
        Fixture {
            mem: guest_memory(0x10_0000),
            image,
            handler,
            metrics,
        }
    }

    fn header(&self, kind: u32, sector: u64) {
        self.mem.write_obj(kind.to_le(), GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem
            .write_obj(sector.to_le(), GuestAddress(HDR + 8))
            .unwrap();
        self.mem.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
    }

    /// Pushes one chain built from `descs` (next fields filled in), runs the
    /// handler and returns (used id, used len, needs notify).
    fn run(&mut self, descs: &[(u64, u32, u16)]) -> (u32, u32, bool) {
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = i + 1 < descs.len();
                let flags = if next {
                    flags | VRING_DESC_F_NEXT as u16
                } else {
                    flags
                };
                Descriptor::new(addr, len, flags, (i + 1) as u16).into()
            })
            .collect();
        let vq = MockSplitQueue::create(&self.mem, GuestAddress(0x8_0000), 16);
        vq.add_desc_chains(&raw, 0).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        let notify = self.handler.process_queue(&self.mem, &mut queue).unwrap();
        assert_eq!(vq.used().idx().load(), 1, "chain returned to the used ring");
        let elem = vq.used().ring().ref_at(0).unwrap().load();
        (elem.id(), elem.len(), notify)
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn file(&self) -> Vec<u8> {
        std::fs::read(self.image.path()).unwrap()
    }
}

fn valid_read() -> [(u64, u32, u16); 3] {
    [(HDR, 16, 0), (DATA, 1024, W), (STATUS, 1, W)]
}

#[test]
fn read_copies_sectors_into_guest() {
    let mut f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_IN, 3);
    let (id, len, notify) = f.run(&valid_read());
    assert_eq!((id, len), (0, 1024 + 1));
    assert!(notify);
    assert_eq!(f.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(f.guest(DATA, 1024), f.file()[3 * 512..5 * 512]);
    assert_eq!(f.metrics.read_bytes.load(Ordering::Relaxed), 1024);
}

#[test]
fn read_scatters_over_several_buffers() {
    let mut f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_IN, 0);
    let (_, len, _) = f.run(&[
        (HDR, 16, 0),
        (DATA, 512, W),
        (0x5000, 1024, W),
        (STATUS, 1, W),
    ]);
    assert_eq!(len, 1536 + 1);
    assert_eq!(f.guest(DATA, 512), f.file()[..512]);
    assert_eq!(f.guest(0x5000, 1024), f.file()[512..1536]);
}

#[test]
fn write_reaches_the_file() {
    let mut f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_OUT, 2);
    f.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    let (_, len, _) = f.run(&[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)]);
    assert_eq!(len, 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_OK as u8);
    let file = f.file();
    assert_eq!(file[1024..1536], [0x5a; 512]);
    assert_eq!(
        file[..1024],
        pattern(1024)[..],
        "neighbouring sectors untouched"
    );
    assert_eq!(f.metrics.write_bytes.load(Ordering::Relaxed), 512);
}

#[test]
fn write_up_to_last_sector_is_accepted() {
    let mut f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_OUT, SECTORS - 1);
    let (_, _, _) = f.run(&[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)]);
    assert_eq!(f.status(), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn flush_succeeds() {
    let mut f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_FLUSH, 0);
    let (_, len, _) = f.run(&[(HDR, 16, 0), (STATUS, 1, W)]);
    assert_eq!(len, 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(f.metrics.flushes.load(Ordering::Relaxed), 1);
}

#[test]
fn get_id_returns_20_byte_serial() {
    let mut f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_GET_ID, 0);
    f.mem.write_slice(&[0xee; 32], GuestAddress(DATA)).unwrap();
    let (_, len, _) = f.run(&[(HDR, 16, 0), (DATA, 32, W), (STATUS, 1, W)]);
    assert_eq!(len, 21);
    assert_eq!(f.status(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(&f.guest(DATA, 20)[..], b"serial-0123456789abc");
    assert_eq!(f.guest(DATA + 20, 12), [0xee; 12], "nothing past 20 bytes");
}

#[test]
fn unknown_type_is_unsupported() {
    let mut f = Fixture::new(false);
    f.header(99, 0);
    let (_, len, _) = f.run(&[(HDR, 16, 0), (STATUS, 1, W)]);
    assert_eq!(len, 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(f.metrics.unsupported.load(Ordering::Relaxed), 1);
}

#[test]
fn write_on_read_only_disk_fails() {
    let mut f = Fixture::new(true);
    f.header(VIRTIO_BLK_T_OUT, 0);
    f.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
    let (_, len, _) = f.run(&[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)]);
    assert_eq!(len, 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(f.file(), pattern(SECTORS as usize * 512));
}

#[test]
fn read_only_disk_opened_read_only_and_advertised() {
    let image = TempImage::new("ro", &[0; 4096]).unwrap();
    let config = BlockConfig {
        id: "ro0".into(),
        path: image.path().into(),
        read_only: true,
    };
    let block = Block::new(config, WorkerOptions::default()).unwrap();
    assert_ne!(block.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
    // SAFETY: F_GETFL on an fd owned by the disk, which outlives the call.
    let flags = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(block.disk.file_for_tests()),
            libc::F_GETFL,
        )
    };
    assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY);
}

#[test]
fn config_space_reports_capacity_seg_max_blk_size() {
    let image = TempImage::new("cfg", &[0; 8 * 512 + 100]).unwrap();
    let config = BlockConfig {
        id: "b".into(),
        path: image.path().into(),
        read_only: false,
    };
    let block = Block::new(config, WorkerOptions::default()).unwrap();
    let mut buf = [0u8; 8];
    block.read_config(0, &mut buf);
    assert_eq!(u64::from_le_bytes(buf), 8, "partial sector ignored");
    let mut word = [0u8; 4];
    block.read_config(12, &mut word);
    assert_eq!(u32::from_le_bytes(word), SEG_MAX);
    block.read_config(20, &mut word);
    assert_eq!(u32::from_le_bytes(word), 512);
    block.read_config(100, &mut word);
    assert_eq!(word, [0; 4]);
}

/// Runs a chain that must be rejected with IOERR in its status byte.
fn assert_rejected_with_ioerr(f: &mut Fixture, descs: &[(u64, u32, u16)]) {
    let before = f.file();
    let (_, len, _) = f.run(descs);
    assert_eq!(len, 1);
    assert_eq!(f.status(), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(f.file(), before);
    assert_eq!(f.metrics.errors.load(Ordering::Relaxed), 1);
}

#[test]
fn data_outside_guest_memory_is_rejected() {
    let mut f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_rejected_with_ioerr(&mut f, &[(HDR, 16, 0), (0xf_ff00, 512, W), (STATUS, 1, W)]);
    f.header(VIRTIO_BLK_T_IN, 0);
    f.metrics.errors.store(0, Ordering::Relaxed);
    assert_rejected_with_ioerr(
        &mut f,
        &[(HDR, 16, 0), (u64::MAX - 100, 512, W), (STATUS, 1, W)],
    );
}

#[test]
fn header_outside_guest_memory_is_rejected() {
    let mut f = Fixture::new(false);
    f.mem.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
    assert_rejected_with_ioerr(&mut f, &[(0x1_0000_0000, 16, 0), (STATUS, 1, W)]);
}

#[test]
fn wrong_direction_is_rejected() {
    let mut f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_IN, 0);
    f.mem.write_slice(&[0x11; 512], GuestAddress(DATA)).unwrap();
    assert_rejected_with_ioerr(&mut f, &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)]);
    assert_eq!(
        f.guest(DATA, 512),
        [0x11; 512],
        "read-only buffer not written"
    );
    f.header(VIRTIO_BLK_T_OUT, 0);
    f.metrics.errors.store(0, Ordering::Relaxed);
    assert_rejected_with_ioerr(&mut f, &[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)]);
}

#[test]
fn short_header_is_rejected() {
    let mut f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_rejected_with_ioerr(&mut f, &[(HDR, 8, 0), (DATA, 512, W), (STATUS, 1, W)]);
}

#[test]
fn writable_header_is_rejected() {
    let mut f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_rejected_with_ioerr(&mut f, &[(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)]);
}

#[test]
fn sector_past_capacity_is_rejected() {
    let mut f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_OUT, SECTORS - 1);
    assert_rejected_with_ioerr(&mut f, &[(HDR, 16, 0), (DATA, 1024, 0), (STATUS, 1, W)]);
    f.header(VIRTIO_BLK_T_IN, SECTORS);
    f.metrics.errors.store(0, Ordering::Relaxed);
    assert_rejected_with_ioerr(&mut f, &[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)]);
}

#[test]
fn sector_overflow_is_rejected() {
    let mut f = Fixture::new(false);
    for sector in [u64::MAX, u64::MAX / 512, u64::MAX / 512 - 1] {
        f.header(VIRTIO_BLK_T_OUT, sector);
        f.metrics.errors.store(0, Ordering::Relaxed);
        assert_rejected_with_ioerr(&mut f, &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)]);
    }
}

#[test]
fn unaligned_length_is_rejected() {
    let mut f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_OUT, 0);
    assert_rejected_with_ioerr(&mut f, &[(HDR, 16, 0), (DATA, 100, 0), (STATUS, 1, W)]);
}

#[test]
fn oversized_request_is_rejected() {
    let mut f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_IN, 0);
    // Five 1 MiB buffers over the same guest range: 5 MiB > MAX_REQUEST_BYTES.
    let mut descs = vec![(HDR, 16, 0)];
    descs.extend(std::iter::repeat_n((0u64, 0x10_0000u32, W), 5));
    descs.push((STATUS, 1, W));
    let before = f.guest(0, 0x1000);
    let (_, len, _) = f.run(&descs);
    assert_eq!((len, f.status()), (1, VIRTIO_BLK_S_IOERR as u8));
    assert_eq!(
        f.guest(0, 0x1000)[..0x800],
        before[..0x800],
        "nothing read into the buffers"
    );
    let parsed = Request::parse_descs(&crate::testing::descs(&descs), &f.mem, SECTORS);
    assert_eq!(parsed, Err(ParseError::TooLarge(5 << 20)));
}

#[test]
fn missing_status_returns_len_zero() {
    let mut f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_IN, 0);
    let (_, len, notify) = f.run(&[(HDR, 16, 0)]);
    assert_eq!(len, 0);
    assert!(notify, "the chain is still returned");
    assert_eq!(f.status(), 0xaa);
}

#[test]
fn read_only_status_returns_len_zero() {
    let mut f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_IN, 0);
    let (_, len, _) = f.run(&[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, 0)]);
    assert_eq!(len, 0);
    assert_eq!(f.status(), 0xaa);
    assert_eq!(f.guest(DATA, 512), [0; 512], "no data moved");
}

#[test]
fn status_outside_memory_returns_len_zero() {
    let mut f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_IN, 0);
    let (_, len, _) = f.run(&[(HDR, 16, 0), (DATA, 512, W), (0x1_0000_0000, 1, W)]);
    assert_eq!(len, 0);
}

#[test]
fn looping_chain_is_returned() {
    let mut f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_IN, 0);
    let raw: Vec<RawDescriptor> = vec![
        Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1).into(),
        Descriptor::new(
            STATUS,
            1,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            0,
        )
        .into(),
    ];
    let vq = MockSplitQueue::create(&f.mem, GuestAddress(0x8_0000), 16);
    vq.add_desc_chains(&raw, 0).unwrap();
    let mut queue: Queue = vq.create_queue().unwrap();
    assert!(f.handler.process_queue(&f.mem, &mut queue).unwrap());
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(f.metrics.errors.load(Ordering::Relaxed), 1);
}

#[test]
fn bogus_head_index_does_not_stall() {
    let mut f = Fixture::new(false);
    let vq = MockSplitQueue::create(&f.mem, GuestAddress(0x8_0000), 16);
    let mut queue: Queue = vq.create_queue().unwrap();
    // Avail ring entry 0 names descriptor 1000 of a 16-entry table.
    vq.avail().ring().ref_at(0).unwrap().store(1000u16.to_le());
    vq.avail().idx().store(1u16.to_le());
    f.handler.process_queue(&f.mem, &mut queue).unwrap();
    assert_eq!(queue.next_avail(), 1, "entry consumed");
}

#[test]
fn corrupt_avail_index_does_not_spin() {
    let mut f = Fixture::new(false);
    let vq = MockSplitQueue::create(&f.mem, GuestAddress(0x8_0000), 16);
    let mut queue: Queue = vq.create_queue().unwrap();
    vq.avail().idx().store(500u16.to_le());
    assert!(!f.handler.process_queue(&f.mem, &mut queue).unwrap());
}

#[test]
fn several_chains_in_one_pass() {
    let mut f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_IN, 0);
    let raw: Vec<RawDescriptor> = [
        (HDR, 16, VRING_DESC_F_NEXT as u16, 1),
        (
            DATA,
            512,
            (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
            2,
        ),
        (STATUS, 1, W, 0),
        (HDR, 16, VRING_DESC_F_NEXT as u16, 4),
        (
            0x5000,
            512,
            (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
            5,
        ),
        (STATUS + 1, 1, W, 0),
    ]
    .iter()
    .map(|&(a, l, fl, n)| Descriptor::new(a, l, fl, n).into())
    .collect();
    let vq = MockSplitQueue::create(&f.mem, GuestAddress(0x8_0000), 16);
    vq.add_desc_chains(&raw, 0).unwrap();
    let mut queue: Queue = vq.create_queue().unwrap();
    assert!(f.handler.process_queue(&f.mem, &mut queue).unwrap());
    assert_eq!(vq.used().idx().load(), 2);
    let second = vq.used().ring().ref_at(1).unwrap().load();
    assert_eq!((second.id(), second.len()), (3, 513));
    assert_eq!(f.guest(0x5000, 512), f.file()[..512]);
}

#[test]
fn event_idx_suppresses_notification() {
    let mut f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_FLUSH, 0);
    let raw: Vec<RawDescriptor> = vec![
        Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1).into(),
        Descriptor::new(STATUS, 1, W, 0).into(),
    ];
    let vq = MockSplitQueue::create(&f.mem, GuestAddress(0x8_0000), 16);
    vq.add_desc_chains(&raw, 0).unwrap();
    let mut queue: Queue = vq.create_queue().unwrap();
    queue.set_event_idx(true);
    // used_event (after the avail ring) = 5: the driver wants an interrupt
    // only once the used index passes 5.
    let used_event = vq.avail_addr().0 + 4 + 2 * 16;
    f.mem
        .write_obj(5u16.to_le(), GuestAddress(used_event))
        .unwrap();
    assert!(!f.handler.process_queue(&f.mem, &mut queue).unwrap());
    assert_eq!(vq.used().idx().load(), 1);
}

#[test]
fn parser_reports_each_error() {
    let f = Fixture::new(false);
    f.header(VIRTIO_BLK_T_IN, 0);
    let parse =
        |d: &[(u64, u32, u16)]| Request::parse_descs(&crate::testing::descs(d), &f.mem, SECTORS);
    assert_eq!(parse(&[(STATUS, 1, W)]), Err(ParseError::MissingStatus));
    assert!(matches!(
        parse(&[(HDR, 16, 0), (STATUS, 2, W)]),
        Err(ParseError::BadStatus(_))
    ));
    assert!(matches!(
        parse(&[(HDR, 15, 0), (STATUS, 1, W)]),
        Err(ParseError::BadHeader(_))
    ));
    assert!(matches!(
        parse(&[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, W)]),
        Err(ParseError::WrongDirection(_))
    ));
    assert!(matches!(
        parse(&[(HDR, 16, 0), (0x10_0000, 512, W), (STATUS, 1, W)]),
        Err(ParseError::OutOfMemory(_))
    ));
    let ok = parse(&[(HDR, 16, 0), (DATA, 512, W), (STATUS, 1, W)]).unwrap();
    assert_eq!(
        (ok.kind, ok.sector, ok.data_len, ok.status),
        (RequestType::In, 0, 512, GuestAddress(STATUS))
    );
}

#[test]
fn device_activates_processes_and_resets() {
    use crate::testing::{Buf, CountingInterrupt, DriverQueue};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    let image = TempImage::new("dev", &pattern(8 * 512)).unwrap();
    let config = BlockConfig {
        id: "blk0".into(),
        path: image.path().into(),
        read_only: false,
    };
    let mut block = Block::new(config, WorkerOptions::default()).unwrap();
    block.ack_features(block.device_features());
    let mem = guest_memory(0x10_0000);
    let mut driver = DriverQueue::new(GuestAddress(0x8_0000), 256);
    let notify = EventFd::new(EFD_NONBLOCK).unwrap();
    let queue = ActivatedQueue {
        index: 0,
        queue: driver.device_queue(),
        notify: notify.try_clone().unwrap(),
    };
    let irq = Arc::new(CountingInterrupt::default());
    block
        .activate(mem.clone(), irq.clone(), vec![queue])
        .unwrap();

    mem.write_obj(VIRTIO_BLK_T_IN.to_le(), GuestAddress(HDR))
        .unwrap();
    mem.write_obj(1u64.to_le(), GuestAddress(HDR + 8)).unwrap();
    driver.add_chain(
        &mem,
        &[
            Buf {
                addr: GuestAddress(HDR),
                len: 16,
                writable: false,
            },
            Buf {
                addr: GuestAddress(DATA),
                len: 512,
                writable: true,
            },
            Buf {
                addr: GuestAddress(STATUS),
                len: 1,
                writable: true,
            },
        ],
    );
    notify.write(1).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let used = loop {
        if let Some(used) = driver.pop_used(&mem) {
            break used;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "worker never completed the request"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    assert_eq!(used, (0, 513));
    let mut data = vec![0; 512];
    mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert_eq!(data, pattern(1024)[512..]);
    while irq.queue[0].load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "no interrupt");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(block.reset());
    assert!(!block.worker.is_running());
}

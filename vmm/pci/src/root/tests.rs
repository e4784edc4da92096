use std::sync::{Arc, Mutex};

use super::*;
use crate::config::{PciBarKind, PciBarRegion};

pub(crate) const IO: u64 = PCI_CONFIG_IO_PORT;
pub(crate) const ECAM: u64 = 0xe000_0000;
pub(crate) const MMIO: u64 = 0xc000_0000;
pub(crate) const MMIO_SIZE: u64 = 0x2000_0000;

pub(crate) fn layout() -> PciRootLayout {
    PciRootLayout {
        io_base: IO,
        ecam_base: ECAM,
        mmio_base: MMIO,
        mmio_size: MMIO_SIZE,
    }
}

/// Config access through 0xCF8/0xCFC.
pub(crate) fn cf8_read(root: &mut PciRoot, dev: u32, reg: u32, len: usize) -> u32 {
    let address = CONFIG_ADDRESS_ENABLE | dev << 11 | (reg & 0xfc);
    root.write(IO, 0, &address.to_le_bytes());
    let mut data = [0u8; 4];
    root.read(IO, 4 + u64::from(reg & 3), &mut data[..len]);
    u32::from_le_bytes(data)
}

pub(crate) fn cf8_write(root: &mut PciRoot, dev: u32, reg: u32, value: u32, len: usize) {
    let address = CONFIG_ADDRESS_ENABLE | dev << 11 | (reg & 0xfc);
    root.write(IO, 0, &address.to_le_bytes());
    root.write(IO, 4 + u64::from(reg & 3), &value.to_le_bytes()[..len]);
}

pub(crate) fn ecam_offset(dev: u64, reg: u64) -> u64 {
    dev << 15 | reg
}

pub(crate) fn ecam_read(root: &mut PciRoot, dev: u64, reg: u64, len: usize) -> u32 {
    let mut data = [0u8; 4];
    root.read(ECAM, ecam_offset(dev, reg), &mut data[..len]);
    u32::from_le_bytes(data)
}

pub(crate) fn ecam_write(root: &mut PciRoot, dev: u64, reg: u64, value: u32, len: usize) {
    root.write(ECAM, ecam_offset(dev, reg), &value.to_le_bytes()[..len]);
}

/// Reads/writes a guest address inside the MMIO window.
pub(crate) fn mmio_read(root: &mut PciRoot, address: u64, len: usize) -> u64 {
    let mut data = [0u8; 8];
    root.read(MMIO, address - MMIO, &mut data[..len]);
    u64::from_le_bytes(data)
}

#[derive(Default)]
struct Log {
    writes: Vec<(usize, u64, Vec<u8>)>,
    moves: Vec<(usize, Option<u64>)>,
}

/// A function with a 4 KiB 32-bit BAR 0 and a 16 KiB 64-bit BAR 2 whose
/// reads return the offset and whose writes are logged.
struct TestDevice {
    config: PciConfiguration,
    log: Arc<Mutex<Log>>,
}

impl TestDevice {
    fn new() -> (Box<Self>, Arc<Mutex<Log>>) {
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: 0x1234,
            device_id: 0x5678,
            class_code: 0x01_80_00,
            ..Default::default()
        });
        let bar0 = PciBarRegion {
            index: 0,
            size: 0x1000,
            kind: PciBarKind::Memory32,
            prefetchable: false,
        };
        let bar2 = PciBarRegion {
            index: 2,
            size: 0x4000,
            kind: PciBarKind::Memory64,
            prefetchable: false,
        };
        config.add_bar(bar0).unwrap();
        config.add_bar(bar2).unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        (
            Box::new(Self {
                config,
                log: log.clone(),
            }),
            log,
        )
    }
}

impl PciDevice for TestDevice {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.config.read_register(reg_idx)
    }
    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        self.config.write_register(reg_idx, offset, data)
    }
    fn bars(&self) -> Vec<PciBarRegion> {
        self.config.bars()
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let value = (bar as u64) << 32 | offset;
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        self.log
            .lock()
            .unwrap()
            .writes
            .push((bar, offset, data.to_vec()));
    }
    fn bar_moved(&mut self, bar: usize, address: Option<u64>) {
        self.log.lock().unwrap().moves.push((bar, address));
    }
}

#[test]
fn host_bridge_through_cf8() {
    let mut root = PciRoot::new(layout()).unwrap();
    assert_eq!(cf8_read(&mut root, 0, 0, 4), 0x0008_1b36);
    assert_eq!(cf8_read(&mut root, 0, 2, 2), 0x0008);
    assert_eq!(cf8_read(&mut root, 0, 8, 4) >> 8, HOST_BRIDGE_CLASS);
    assert_eq!(cf8_read(&mut root, 0, 0xb, 1), 0x06, "base class byte");
    assert_eq!(cf8_read(&mut root, 3, 0, 4), u32::MAX, "empty slot");
    // The latch reads back without the reserved low bits.
    root.write(IO, 0, &0x8000_0803u32.to_le_bytes());
    let mut latch = [0u8; 4];
    root.read(IO, 0, &mut latch);
    assert_eq!(u32::from_le_bytes(latch), 0x8000_0800);
}

#[test]
fn cf8_rejects_disabled_other_bus_and_function() {
    let mut root = PciRoot::new(layout()).unwrap();
    let mut data = [0u8; 4];
    for address in [0x0000_0000u32, 0x8001_0000, 0x8000_0100] {
        root.write(IO, 0, &address.to_le_bytes());
        root.read(IO, 4, &mut data);
        assert_eq!(u32::from_le_bytes(data), u32::MAX, "address {address:#x}");
    }
    // A partial write to the address port does not move the latch.
    root.write(IO, 0, &0x8000_0000u32.to_le_bytes());
    root.write(IO, 1, &[0x08]);
    root.read(IO, 4, &mut data);
    assert_eq!(u32::from_le_bytes(data), 0x0008_1b36);
    // Partial data accesses at each byte lane.
    for lane in 0..4u64 {
        let mut b = [0u8; 1];
        root.read(IO, 4 + lane, &mut b);
        assert_eq!(b[0], 0x0008_1b36u32.to_le_bytes()[lane as usize]);
    }
}

#[test]
fn host_bridge_through_ecam() {
    let mut root = PciRoot::new(layout()).unwrap();
    assert_eq!(ecam_read(&mut root, 0, 0, 4), 0x0008_1b36);
    assert_eq!(ecam_read(&mut root, 0, 2, 2), 0x0008);
    assert_eq!(
        ecam_read(&mut root, 0, 0x100, 4),
        0,
        "extended space of a present function"
    );
    assert_eq!(ecam_read(&mut root, 31, 0, 4), u32::MAX);
    let mut data = [0u8; 4];
    root.read(ECAM, 1 << 12, &mut data);
    assert_eq!(u32::from_le_bytes(data), u32::MAX, "function 1");
    root.read(ECAM, 2, &mut data);
    assert_eq!(data, [0xff; 4], "access across a dword");
}

#[test]
fn bars_preassigned_aligned_and_decoded() {
    let mut root = PciRoot::new(layout()).unwrap();
    let (dev, log) = TestDevice::new();
    assert_eq!(root.add_device(dev).unwrap(), 1);
    let bar0 = u64::from(ecam_read(&mut root, 1, 0x10, 4));
    let bar2 = u64::from(ecam_read(&mut root, 1, 0x18, 4) & !0xf)
        | u64::from(ecam_read(&mut root, 1, 0x1c, 4)) << 32;
    assert_eq!(bar0, MMIO);
    assert_eq!(bar2 % 0x4000, 0);
    assert!(bar2 >= MMIO + 0x1000 && bar2 + 0x4000 <= MMIO + MMIO_SIZE);
    assert_ne!(
        ecam_read(&mut root, 1, 4, 2) as u16 & COMMAND_MEMORY_SPACE,
        0
    );
    assert_eq!(
        log.lock().unwrap().moves,
        vec![(0, Some(bar0)), (2, Some(bar2))]
    );
    assert_eq!(mmio_read(&mut root, bar2 + 0x10, 8), 2 << 32 | 0x10);
    assert_eq!(mmio_read(&mut root, bar0 + 0xffc, 4), 0xffc);
    assert_eq!(
        mmio_read(&mut root, bar0 + 0xffc, 8),
        u64::MAX,
        "straddles the BAR end"
    );
    root.write(MMIO, bar2 - MMIO + 8, &[1, 2]);
    assert_eq!(log.lock().unwrap().writes, vec![(2, 8, vec![1, 2])]);
}

#[test]
fn bar_sizing_through_cf8() {
    let mut root = PciRoot::new(layout()).unwrap();
    root.add_device(TestDevice::new().0).unwrap();
    let original = cf8_read(&mut root, 1, 0x18, 4);
    cf8_write(&mut root, 1, 0x18, u32::MAX, 4);
    cf8_write(&mut root, 1, 0x1c, u32::MAX, 4);
    assert_eq!(
        cf8_read(&mut root, 1, 0x18, 4),
        0xffff_c004,
        "64-bit type bits kept"
    );
    assert_eq!(cf8_read(&mut root, 1, 0x1c, 4), u32::MAX);
    cf8_write(&mut root, 1, 0x10, u32::MAX, 4);
    assert_eq!(cf8_read(&mut root, 1, 0x10, 4), 0xffff_f000);
    cf8_write(&mut root, 1, 0x18, original, 4);
    cf8_write(&mut root, 1, 0x1c, 0, 4);
    assert_eq!(cf8_read(&mut root, 1, 0x18, 4), original);
    // Byte-lane writes through 0xCFC..0xCFF: interrupt line (RW) and pin (RO).
    cf8_write(&mut root, 1, 0x3c, 0x0b, 1);
    cf8_write(&mut root, 1, 0x3d, 0x04, 1);
    assert_eq!(cf8_read(&mut root, 1, 0x3c, 2), 0x000b);
    cf8_write(&mut root, 1, 0x06, 0xffff, 2);
    assert_eq!(
        cf8_read(&mut root, 1, 0x04, 4),
        0x0000_0002,
        "status read-only, command kept"
    );
}

#[test]
fn reprogrammed_bar_moves_dispatch() {
    let mut root = PciRoot::new(layout()).unwrap();
    let (dev, log) = TestDevice::new();
    root.add_device(dev).unwrap();
    log.lock().unwrap().moves.clear();
    let old = u64::from(ecam_read(&mut root, 1, 0x10, 4));
    let new = MMIO + 0x10_0000;
    ecam_write(&mut root, 1, 0x10, new as u32, 4);
    assert_eq!(mmio_read(&mut root, new + 4, 4), 4);
    assert_eq!(
        mmio_read(&mut root, old + 4, 4),
        0xffff_ffff,
        "old address unclaimed"
    );
    // Sizing moves the BAR outside the window: no longer decoded.
    ecam_write(&mut root, 1, 0x10, u32::MAX, 4);
    assert_eq!(mmio_read(&mut root, new + 4, 4), 0xffff_ffff);
    ecam_write(&mut root, 1, 0x10, new as u32, 4);
    // Memory decoding off: nothing is decoded.
    ecam_write(&mut root, 1, 4, 0, 2);
    assert_eq!(mmio_read(&mut root, new + 4, 4), 0xffff_ffff);
    ecam_write(&mut root, 1, 4, u32::from(COMMAND_MEMORY_SPACE), 2);
    assert_eq!(mmio_read(&mut root, new + 4, 4), 4);
    let bar2 = root.slots[1].as_ref().unwrap().bars[1].address;
    assert_eq!(
        log.lock().unwrap().moves,
        vec![
            (0, Some(new)),
            (0, None),
            (0, Some(new)),
            (0, None),
            (2, None),
            (0, Some(new)),
            (2, bar2)
        ]
    );
}

#[test]
fn acpi_view() {
    let mut root = PciRoot::new(layout()).unwrap();
    root.add_device(TestDevice::new().0).unwrap();
    assert_eq!(root.mmio_window(), (MMIO, MMIO_SIZE));
    assert_eq!(root.ecam(), (ECAM, ECAM_SIZE));
    assert_eq!(root.bus_range(), 0..=0);
    assert_eq!(
        root.devices(),
        vec![
            PciDeviceInfo {
                slot: 0,
                vendor_id: 0x1b36,
                device_id: 0x0008,
                class_code: 0x06_00_00
            },
            PciDeviceInfo {
                slot: 1,
                vendor_id: 0x1234,
                device_id: 0x5678,
                class_code: 0x01_80_00
            },
        ]
    );
}

#[test]
fn slots_and_window_run_out() {
    let mut root = PciRoot::new(layout()).unwrap();
    for slot in 1..32 {
        assert_eq!(root.add_device(TestDevice::new().0).unwrap(), slot);
    }
    assert_eq!(
        root.add_device(TestDevice::new().0),
        Err(RootError::NoFreeSlot)
    );

    let small = PciRootLayout {
        mmio_size: 0x8000,
        ..layout()
    };
    let mut root = PciRoot::new(small).unwrap();
    root.add_device(TestDevice::new().0).unwrap();
    assert_eq!(
        root.add_device(TestDevice::new().0),
        Err(RootError::WindowFull { size: 0x1000 })
    );
    assert!(root.slots[2].is_none(), "failed add leaves no trace");
}

#[test]
fn layout_validation() {
    assert!(PciRoot::new(PciRootLayout {
        mmio_size: 0,
        ..layout()
    })
    .is_err());
    assert!(PciRoot::new(PciRootLayout {
        ecam_base: MMIO + 0x1000,
        ..layout()
    })
    .is_err());
    assert!(PciRoot::new(PciRootLayout {
        mmio_base: u64::MAX,
        ..layout()
    })
    .is_err());
    assert!(PciRoot::new(PciRootLayout {
        io_base: ECAM,
        ..layout()
    })
    .is_err());
}

/// A deterministic xorshift generator for garbage accesses.
pub(crate) struct Garbage(pub u64);

impl Garbage {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn garbage_accesses_never_panic() {
    let mut root = PciRoot::new(layout()).unwrap();
    let (dev, _) = TestDevice::new();
    root.add_device(dev).unwrap();
    let mut rng = Garbage(0x9e37_79b9_7f4a_7c15);
    let ranges = [
        (IO, PCI_CONFIG_IO_SIZE),
        (ECAM, ECAM_SIZE),
        (MMIO, MMIO_SIZE),
        (0x1234, 16),
    ];
    for _ in 0..20_000 {
        let (base, len) = ranges[(rng.next() % 4) as usize];
        let offset = rng.next() % (len + 8);
        let size = (rng.next() % 10) as usize;
        let mut data = vec![0u8; size];
        if rng.next() % 2 == 0 {
            root.read(base, offset, &mut data);
        } else {
            data.iter_mut().for_each(|b| *b = rng.next() as u8);
            root.write(base, offset, &data);
        }
    }
    // The host bridge is still there.
    assert_eq!(ecam_read(&mut root, 0, 0, 4), 0x0008_1b36);
}

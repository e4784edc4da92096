//! The transport driven the way a guest driver drives it: through a
//! [`PciRoot`], ECAM / 0xCF8 for configuration and the MMIO window for the
//! BAR, against a fake device that records what the transport does to it.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use ferro_virtio::{
    ActivateError, ActivatedQueue, InterruptKind, QueueT, VirtioInterrupt, VIRTIO_RING_F_EVENT_IDX,
};
use vm_memory::GuestAddress;

use super::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FEATURES_OK};
use super::*;
use crate::bus::BusDevice;
use crate::interrupt::MsiMessage;
use crate::msix::tests::RecordingSink;
use crate::root::tests::{cf8_read, ecam_read, ecam_write, layout, mmio_read, Garbage, ECAM, MMIO};
use crate::root::PciRoot;

const FEATURES: u64 = 1 << 32 | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << 5 | 1;
const SLOT: u64 = 1;

/// A queue as activated: (index, size, desc, avail, used, event_idx).
type QueueSummary = (u16, u16, u64, u64, u64, bool);

/// What the transport did to the fake device.
#[derive(Default)]
struct FakeState {
    acked: Vec<u64>,
    /// The queues of each activation.
    activations: Vec<Vec<QueueSummary>>,
    notify: Vec<EventFd>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    resets: usize,
    fail_activate: bool,
    config: [u8; 8],
}

struct FakeDevice {
    virtio_type: u32,
    sizes: Vec<u16>,
    state: Arc<Mutex<FakeState>>,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        self.virtio_type
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn device_features(&self) -> u64 {
        FEATURES
    }
    fn ack_features(&mut self, features: u64) {
        self.state.lock().unwrap().acked.push(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.state.lock().unwrap().config;
        for (i, b) in data.iter_mut().enumerate() {
            *b = config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut state = self.state.lock().unwrap();
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = state.config.get_mut(offset as usize + i) {
                *slot = *b;
            }
        }
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        let mut state = self.state.lock().unwrap();
        if state.fail_activate {
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: queues.len(),
            });
        }
        let summary = queues
            .iter()
            .map(|q| {
                let queue = &q.queue;
                (
                    q.index,
                    queue.size(),
                    queue.desc_table(),
                    queue.avail_ring(),
                    queue.used_ring(),
                    queue.event_idx_enabled(),
                )
            })
            .collect();
        state.activations.push(summary);
        state.notify = queues.into_iter().map(|q| q.notify).collect();
        state.interrupt = Some(interrupt);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.state.lock().unwrap().resets += 1;
        true
    }
    fn id(&self) -> &str {
        "fake0"
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IoEvent {
    Register(u64),
    Unregister(u64),
}

#[derive(Default)]
struct RecordingRegistrar(Mutex<Vec<IoEvent>>);

impl IoEventRegistrar for RecordingRegistrar {
    fn register(&self, addr: u64, _fd: &EventFd) -> io::Result<()> {
        self.0.lock().unwrap().push(IoEvent::Register(addr));
        Ok(())
    }
    fn unregister(&self, addr: u64, _fd: &EventFd) -> io::Result<()> {
        self.0.lock().unwrap().push(IoEvent::Unregister(addr));
        Ok(())
    }
}

impl RecordingRegistrar {
    fn take(&self) -> Vec<IoEvent> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// A root complex with one fake virtio device in slot 1.
struct Harness {
    root: PciRoot,
    state: Arc<Mutex<FakeState>>,
    sink: Arc<RecordingSink>,
    ioevents: Arc<RecordingRegistrar>,
    bar: u64,
}

impl Harness {
    fn new(virtio_type: u32) -> Self {
        let state = Arc::new(Mutex::new(FakeState {
            config: *b"fakecfg!",
            ..Default::default()
        }));
        let device = FakeDevice {
            virtio_type,
            sizes: vec![256, 256],
            state: state.clone(),
        };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let sink = Arc::new(RecordingSink::default());
        let ioevents = Arc::new(RecordingRegistrar::default());
        let pci =
            VirtioPciDevice::new(Box::new(device), mem, sink.clone(), ioevents.clone()).unwrap();
        let mut root = PciRoot::new(layout()).unwrap();
        assert_eq!(u64::from(root.add_device(Box::new(pci)).unwrap()), SLOT);
        let bar = Self::decode_bar(&mut root);
        Self {
            root,
            state,
            sink,
            ioevents,
            bar,
        }
    }

    fn decode_bar(root: &mut PciRoot) -> u64 {
        let low = ecam_read(root, SLOT, 0x10, 4) & !0xf;
        let high = ecam_read(root, SLOT, 0x14, 4);
        u64::from(high) << 32 | u64::from(low)
    }

    fn read(&mut self, offset: u64, len: usize) -> u64 {
        mmio_read(&mut self.root, self.bar + offset, len)
    }

    fn write(&mut self, offset: u64, value: u64, len: usize) {
        self.root
            .write(MMIO, self.bar + offset - MMIO, &value.to_le_bytes()[..len]);
    }

    fn status(&mut self) -> u8 {
        self.read(0x14, 1) as u8
    }

    fn set_status(&mut self, status: u8) {
        self.write(0x14, u64::from(status), 1);
    }

    fn write_features(&mut self, features: u64) {
        self.write(0x08, 0, 4);
        self.write(0x0c, features & 0xffff_ffff, 4);
        self.write(0x08, 1, 4);
        self.write(0x0c, features >> 32, 4);
    }

    /// Queue `index` at 0x1000 * (index + 1) with `vector`, enabled.
    fn setup_queue(&mut self, index: u16, size: u16, vector: u16) {
        let base = 0x1_0000 * (u64::from(index) + 1);
        self.write(0x16, u64::from(index), 2);
        self.write(0x18, u64::from(size), 2);
        self.write(0x1a, u64::from(vector), 2);
        self.write(0x20, base, 4);
        self.write(0x24, 0, 4);
        self.write(0x28, base + 0x4000, 8);
        self.write(0x30, base + 0x8000, 4);
        self.write(0x34, 0, 4);
        self.write(0x1c, 1, 2);
    }

    /// The driver's side of initialisation up to (not including) DRIVER_OK.
    fn negotiate(&mut self) {
        self.set_status(0);
        self.set_status(ACKNOWLEDGE);
        self.set_status(ACKNOWLEDGE | DRIVER);
        self.write_features(1 << 32 | 1);
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_ne!(self.status() & FEATURES_OK, 0);
        self.setup_queue(0, 128, 1);
        self.setup_queue(1, 256, 2);
        self.write(0x10, 0, 2);
    }

    fn driver_ok(&mut self) {
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    /// Program vector `v` of the MSI-X table and unmask it.
    fn program_vector(&mut self, v: u64) {
        let entry = MSIX_TABLE_OFFSET + v * 16;
        self.write(entry, 0xfee0_0000, 8);
        self.write(entry + 8, 0x40 + v, 4);
        self.write(entry + 12, 0, 4);
    }

    fn enable_msix(&mut self) {
        let cap = ecam_read(&mut self.root, SLOT, 0x34, 1) as u64;
        assert_eq!(
            ecam_read(&mut self.root, SLOT, cap, 1),
            u32::from(CAP_ID_MSIX)
        );
        ecam_write(&mut self.root, SLOT, cap + 2, 0x8002, 2);
    }

    fn trigger(&self, kind: InterruptKind) {
        let interrupt = self
            .state
            .lock()
            .unwrap()
            .interrupt
            .clone()
            .expect("activated");
        interrupt.trigger(kind).unwrap();
    }
}

#[test]
fn identity_through_cf8() {
    let mut h = Harness::new(device_type::NET);
    assert_eq!(cf8_read(&mut h.root, 1, 0, 4), 0x1041_1af4);
    assert_eq!(cf8_read(&mut h.root, 1, 8, 4), 0x0200_0001);
    assert_eq!(cf8_read(&mut h.root, 1, 0x2c, 4), 0x0040_1af4);
    let mut h = Harness::new(device_type::BLOCK);
    assert_eq!(cf8_read(&mut h.root, 1, 0, 4), 0x1042_1af4);
    assert_eq!(cf8_read(&mut h.root, 1, 8, 4) >> 8, 0x01_80_00);
    let mut h = Harness::new(device_type::RNG);
    assert_eq!(cf8_read(&mut h.root, 1, 8, 4) >> 8, 0xff_00_00);
}

#[test]
fn bar_is_64bit_below_4g_and_sizes() {
    let mut h = Harness::new(device_type::NET);
    assert!(h.bar >= MMIO && h.bar + BAR_SIZE <= 1 << 32);
    assert_eq!(h.bar % BAR_SIZE, 0);
    ecam_write(&mut h.root, SLOT, 0x10, u32::MAX, 4);
    ecam_write(&mut h.root, SLOT, 0x14, u32::MAX, 4);
    assert_eq!(ecam_read(&mut h.root, SLOT, 0x10, 4), 0xffff_8004);
    assert_eq!(ecam_read(&mut h.root, SLOT, 0x14, 4), u32::MAX);
}

/// Walk the capability list through 0xCF8/0xCFC as a driver does.
fn walk_caps(root: &mut PciRoot) -> BTreeMap<(u8, u8), u32> {
    assert_ne!(cf8_read(root, 1, 6, 2) & 0x10, 0, "status.CAP_LIST");
    let mut caps = BTreeMap::new();
    let mut ptr = cf8_read(root, 1, 0x34, 1);
    while ptr != 0 {
        let id = cf8_read(root, 1, ptr, 1) as u8;
        let kind = if id == CAP_ID_VENDOR_SPECIFIC {
            cf8_read(root, 1, ptr + 3, 1) as u8
        } else {
            0
        };
        assert!(
            caps.insert((id, kind), ptr).is_none(),
            "loop in the capability list"
        );
        ptr = cf8_read(root, 1, ptr + 1, 1);
    }
    caps
}

#[test]
fn capability_chain_has_virtio_and_msix_caps() {
    let mut h = Harness::new(device_type::NET);
    let caps = walk_caps(&mut h.root);
    let msix = caps[&(CAP_ID_MSIX, 0)];
    assert_eq!(cf8_read(&mut h.root, 1, msix + 2, 2), 2, "3 vectors");
    assert_eq!(cf8_read(&mut h.root, 1, msix + 4, 4), 0x4000);
    assert_eq!(cf8_read(&mut h.root, 1, msix + 8, 4), 0x5000);
    let expect = [
        (VIRTIO_PCI_CAP_COMMON_CFG, COMMON_CFG_OFFSET, 0x38),
        (VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_CFG_OFFSET, 8),
        (VIRTIO_PCI_CAP_ISR_CFG, ISR_CFG_OFFSET, 1),
        (VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, 0x1000),
        (VIRTIO_PCI_CAP_PCI_CFG, 0, 0),
    ];
    for (kind, offset, length) in expect {
        let cap = caps[&(CAP_ID_VENDOR_SPECIFIC, kind)];
        assert_eq!(cf8_read(&mut h.root, 1, cap + 4, 1), 0, "BAR of cap {kind}");
        assert_eq!(
            u64::from(cf8_read(&mut h.root, 1, cap + 8, 4)),
            offset,
            "offset of cap {kind}"
        );
        assert_eq!(
            cf8_read(&mut h.root, 1, cap + 12, 4),
            length,
            "length of cap {kind}"
        );
    }
    let notify = caps[&(CAP_ID_VENDOR_SPECIFIC, VIRTIO_PCI_CAP_NOTIFY_CFG)];
    assert_eq!(cf8_read(&mut h.root, 1, notify + 2, 1), 20, "cap_len");
    assert_eq!(
        cf8_read(&mut h.root, 1, notify + 16, 4),
        4,
        "notify_off_multiplier"
    );
    assert_eq!(caps.len(), 6);
}

#[test]
fn feature_windows_and_features_ok() {
    let mut h = Harness::new(device_type::NET);
    h.set_status(ACKNOWLEDGE | DRIVER);
    h.write(0x00, 0, 4);
    assert_eq!(h.read(0x04, 4), FEATURES & 0xffff_ffff);
    h.write(0x00, 1, 4);
    assert_eq!(h.read(0x04, 4), FEATURES >> 32);
    h.write(0x00, 2, 4);
    assert_eq!(h.read(0x04, 4), 0);
    // Unoffered bit 2: refused.
    h.write_features(1 << 32 | 1 << 2);
    h.write(0x08, 0, 4);
    assert_eq!(h.read(0x0c, 4), 1 << 2, "driver features read back");
    h.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(h.status(), ACKNOWLEDGE | DRIVER);
    // No VERSION_1: refused.
    h.write_features(1);
    h.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(h.status() & FEATURES_OK, 0);
    assert!(h.state.lock().unwrap().acked.is_empty());
    h.write_features(1 << 32 | 1 << 5);
    h.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(h.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(h.state.lock().unwrap().acked, vec![1 << 32 | 1 << 5]);
    // Features are frozen after FEATURES_OK.
    h.write_features(1 << 32);
    h.write(0x08, 0, 4);
    assert_eq!(h.read(0x0c, 4), 1 << 5);
}

#[test]
fn queue_registers() {
    let mut h = Harness::new(device_type::NET);
    assert_eq!(h.read(0x12, 2), 2, "num_queues");
    h.write(0x16, 1, 2);
    assert_eq!(h.read(0x18, 2), 256);
    assert_eq!(h.read(0x1e, 2), 1, "queue_notify_off");
    h.write(0x18, 100, 2);
    h.write(0x18, 512, 2);
    assert_eq!(h.read(0x18, 2), 256, "invalid sizes ignored");
    h.write(0x18, 64, 2);
    assert_eq!(h.read(0x18, 2), 64);
    h.write(0x1a, 2, 2);
    assert_eq!(h.read(0x1a, 2), 2);
    h.write(0x1a, 3, 2);
    assert_eq!(
        h.read(0x1a, 2),
        u64::from(NO_VECTOR),
        "vector past the table"
    );
    h.write(0x10, 7, 2);
    assert_eq!(h.read(0x10, 2), u64::from(NO_VECTOR));
    h.write(0x20, 0x1234_5670, 4);
    h.write(0x24, 0x1, 4);
    assert_eq!(h.read(0x20, 8), 0x1_1234_5670);
    h.write(0x28, 0xabcd_0000_0000_1000, 8);
    assert_eq!(h.read(0x2c, 4), 0xabcd_0000);
    h.write(0x16, 9, 2);
    assert_eq!(h.read(0x18, 2), 0, "missing queue has size 0");
    assert_eq!(h.read(0x1a, 2), u64::from(NO_VECTOR));
    h.write(0x18, 16, 2);
    h.write(0x16, 1, 2);
    h.write(0x1c, 1, 2);
    assert_eq!(h.read(0x1c, 2), 1);
    h.write(0x18, 32, 2);
    assert_eq!(h.read(0x18, 2), 64, "enabled queue is frozen");
}

#[test]
fn driver_ok_activates_with_programmed_queues() {
    let mut h = Harness::new(device_type::NET);
    h.negotiate();
    assert!(h.state.lock().unwrap().activations.is_empty());
    h.driver_ok();
    assert_eq!(h.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(
        h.state.lock().unwrap().activations,
        vec![vec![
            (0, 128, 0x1_0000, 0x1_4000, 0x1_8000, false),
            (1, 256, 0x2_0000, 0x2_4000, 0x2_8000, false)
        ]]
    );
    let notify = h.bar + NOTIFY_CFG_OFFSET;
    assert_eq!(
        h.ioevents.take(),
        vec![IoEvent::Register(notify), IoEvent::Register(notify + 4)]
    );
    // Setting DRIVER_OK again does not re-activate.
    h.driver_ok();
    assert_eq!(h.state.lock().unwrap().activations.len(), 1);
}

#[test]
fn only_enabled_queues_are_handed_over() {
    let mut h = Harness::new(device_type::NET);
    h.set_status(ACKNOWLEDGE | DRIVER);
    h.write_features(1 << 32);
    h.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    h.setup_queue(1, 16, NO_VECTOR);
    h.driver_ok();
    let state = h.state.lock().unwrap();
    assert_eq!(
        state.activations,
        vec![vec![(1, 16, 0x2_0000, 0x2_4000, 0x2_8000, false)]]
    );
    assert_eq!(
        h.ioevents.take(),
        vec![IoEvent::Register(h.bar + NOTIFY_CFG_OFFSET + 4)]
    );
}

#[test]
fn notify_write_signals_the_queue_eventfd() {
    let mut h = Harness::new(device_type::NET);
    h.negotiate();
    h.driver_ok();
    h.write(NOTIFY_CFG_OFFSET + 4, 1, 2);
    let state = h.state.lock().unwrap();
    assert_eq!(state.notify[1].read().unwrap(), 1);
    assert!(state.notify[0].read().is_err(), "queue 0 not signalled");
}

#[test]
fn interrupts_follow_msix_vectors() {
    let mut h = Harness::new(device_type::NET);
    h.negotiate();
    h.write(0x16, 1, 2);
    h.write(0x1a, u64::from(NO_VECTOR), 2);
    h.driver_ok();
    h.program_vector(0);
    h.program_vector(1);
    h.enable_msix();
    h.trigger(InterruptKind::Queue(0));
    h.trigger(InterruptKind::Queue(1));
    assert_eq!(
        h.sink.take(),
        vec![MsiMessage {
            address: 0xfee0_0000,
            data: 0x41
        }]
    );
    let generation = h.read(0x15, 1);
    h.trigger(InterruptKind::Config);
    assert_eq!(
        h.sink.take(),
        vec![MsiMessage {
            address: 0xfee0_0000,
            data: 0x40
        }]
    );
    assert_eq!(h.read(0x15, 1), generation + 1, "config_generation bumped");
    assert_eq!(h.read(ISR_CFG_OFFSET, 1), 3, "ISR records both causes");
    assert_eq!(h.read(ISR_CFG_OFFSET, 1), 0, "read-to-clear");
    // A masked vector pends and is delivered on unmask, once.
    h.write(MSIX_TABLE_OFFSET + 16 + 12, 1, 4);
    h.trigger(InterruptKind::Queue(0));
    assert!(h.sink.take().is_empty());
    assert_eq!(h.read(MSIX_PBA_OFFSET, 8), 0b10);
    h.write(MSIX_TABLE_OFFSET + 16 + 12, 0, 4);
    assert_eq!(h.sink.take().len(), 1);
    assert_eq!(h.read(MSIX_PBA_OFFSET, 8), 0);
}

#[test]
fn reset_stops_device_and_clears_registers() {
    let mut h = Harness::new(device_type::NET);
    h.negotiate();
    h.driver_ok();
    h.ioevents.take();
    h.set_status(0);
    assert_eq!(h.state.lock().unwrap().resets, 1);
    let notify = h.bar + NOTIFY_CFG_OFFSET;
    assert_eq!(
        h.ioevents.take(),
        vec![IoEvent::Unregister(notify), IoEvent::Unregister(notify + 4)]
    );
    assert_eq!(h.status(), 0);
    assert_eq!(h.read(0x16, 2), 0);
    assert_eq!(h.read(0x18, 2), 256);
    assert_eq!(h.read(0x1c, 2), 0);
    assert_eq!(h.read(0x1a, 2), u64::from(NO_VECTOR));
    assert_eq!(h.read(0x10, 2), u64::from(NO_VECTOR));
    assert_eq!(h.read(0x20, 8), 0);
    // A notify after reset reaches nothing, and the device can start again.
    h.write(NOTIFY_CFG_OFFSET, 0, 2);
    assert!(h.state.lock().unwrap().notify[0].read().is_err());
    h.negotiate();
    h.driver_ok();
    assert_eq!(h.state.lock().unwrap().activations.len(), 2);
    // Resetting an inactive device does not call the device.
    h.set_status(0);
    h.set_status(0);
    assert_eq!(h.state.lock().unwrap().resets, 2);
}

#[test]
fn failed_activation_needs_reset() {
    let mut h = Harness::new(device_type::NET);
    h.state.lock().unwrap().fail_activate = true;
    h.negotiate();
    h.driver_ok();
    assert_ne!(h.status() & DEVICE_NEEDS_RESET, 0);
    assert!(h.ioevents.take().is_empty());
    h.write(NOTIFY_CFG_OFFSET, 0, 2);
    h.set_status(0);
    assert_eq!(h.status(), 0);
    assert_eq!(h.state.lock().unwrap().resets, 0, "never activated");
}

#[test]
fn invalid_queue_is_not_activated() {
    let mut h = Harness::new(device_type::NET);
    h.set_status(ACKNOWLEDGE | DRIVER);
    h.write_features(1 << 32);
    h.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    h.write(0x16, 0, 2);
    // The descriptor table lies past the end of guest memory.
    h.write(0x20, 0x10_0000, 8);
    h.write(0x1c, 1, 2);
    h.driver_ok();
    assert_ne!(h.status() & DEVICE_NEEDS_RESET, 0);
    assert!(h.state.lock().unwrap().activations.is_empty());
}

#[test]
fn driver_ok_needs_features_ok_and_bits_cannot_be_cleared() {
    let mut h = Harness::new(device_type::NET);
    h.set_status(ACKNOWLEDGE | DRIVER);
    h.setup_queue(0, 16, 1);
    h.set_status(ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert_eq!(h.status(), ACKNOWLEDGE | DRIVER);
    assert!(h.state.lock().unwrap().activations.is_empty());
    h.set_status(ACKNOWLEDGE);
    assert_eq!(h.status(), ACKNOWLEDGE | DRIVER);
}

#[test]
fn event_idx_reaches_the_queues() {
    let mut h = Harness::new(device_type::NET);
    h.set_status(ACKNOWLEDGE | DRIVER);
    h.write_features(1 << 32 | 1 << VIRTIO_RING_F_EVENT_IDX);
    h.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    h.setup_queue(0, 16, 1);
    h.driver_ok();
    assert_eq!(
        h.state.lock().unwrap().activations,
        vec![vec![(0, 16, 0x1_0000, 0x1_4000, 0x1_8000, true)]]
    );
}

#[test]
fn bar_move_reregisters_ioeventfds_and_moves_notify() {
    let mut h = Harness::new(device_type::NET);
    h.negotiate();
    h.driver_ok();
    h.ioevents.take();
    let old = h.bar;
    let new = MMIO + 0x100_0000;
    ecam_write(&mut h.root, SLOT, 0x10, new as u32, 4);
    h.bar = new;
    let (o, n) = (old + NOTIFY_CFG_OFFSET, new + NOTIFY_CFG_OFFSET);
    assert_eq!(
        h.ioevents.take(),
        vec![
            IoEvent::Unregister(o),
            IoEvent::Unregister(o + 4),
            IoEvent::Register(n),
            IoEvent::Register(n + 4)
        ]
    );
    h.write(NOTIFY_CFG_OFFSET, 0, 2);
    assert_eq!(h.state.lock().unwrap().notify[0].read().unwrap(), 1);
    assert_eq!(h.read(0x12, 2), 2, "common config at the new address");
    assert_eq!(
        mmio_read(&mut h.root, old + 0x12, 2),
        0xffff,
        "nothing at the old one"
    );
    // Decoding off: unregistered, and back on: registered again.
    ecam_write(&mut h.root, SLOT, 4, 0, 2);
    assert_eq!(
        h.ioevents.take(),
        vec![IoEvent::Unregister(n), IoEvent::Unregister(n + 4)]
    );
    ecam_write(&mut h.root, SLOT, 4, 2, 2);
    assert_eq!(
        h.ioevents.take(),
        vec![IoEvent::Register(n), IoEvent::Register(n + 4)]
    );
}

#[test]
fn device_config_passthrough() {
    let mut h = Harness::new(device_type::NET);
    assert_eq!(
        h.read(DEVICE_CFG_OFFSET, 4),
        u64::from(u32::from_le_bytes(*b"fake"))
    );
    h.write(DEVICE_CFG_OFFSET + 4, 0x2121, 2);
    assert_eq!(&h.state.lock().unwrap().config, b"fake!!g!");
    assert_eq!(h.read(DEVICE_CFG_OFFSET + 0x100, 4), 0);
}

#[test]
fn pci_cfg_capability_reaches_the_bar() {
    let mut h = Harness::new(device_type::NET);
    let caps = walk_caps(&mut h.root);
    let cap = u64::from(caps[&(CAP_ID_VENDOR_SPECIFIC, VIRTIO_PCI_CAP_PCI_CFG)]);
    ecam_write(&mut h.root, SLOT, cap + 4, 0, 1);
    ecam_write(&mut h.root, SLOT, cap + 8, 0x12, 4);
    ecam_write(&mut h.root, SLOT, cap + 12, 2, 4);
    assert_eq!(
        ecam_read(&mut h.root, SLOT, cap + 16, 4),
        2,
        "num_queues via config space"
    );
    ecam_write(&mut h.root, SLOT, cap + 8, 0x16, 4);
    ecam_write(&mut h.root, SLOT, cap + 16, 1, 4);
    assert_eq!(h.read(0x16, 2), 1, "queue_select written via config space");
    // Misaligned or bad length: ignored.
    ecam_write(&mut h.root, SLOT, cap + 8, 0x13, 4);
    assert_eq!(ecam_read(&mut h.root, SLOT, cap + 16, 4), 0);
    ecam_write(&mut h.root, SLOT, cap + 12, 3, 4);
    ecam_write(&mut h.root, SLOT, cap + 16, 0, 4);
    assert_eq!(h.read(0x16, 2), 1);
}

#[test]
fn garbage_accesses_never_panic() {
    let mut h = Harness::new(device_type::NET);
    let mut rng = Garbage(0x2545_f491_4f6c_dd1d);
    for round in 0..3 {
        if round == 1 {
            h.negotiate();
            h.driver_ok();
        }
        for _ in 0..20_000 {
            let size = (rng.next() % 10) as usize;
            let mut data = vec![0u8; size];
            data.iter_mut().for_each(|b| *b = rng.next() as u8);
            let (base, offset) = match rng.next() % 3 {
                0 => (ECAM, (SLOT << 15) | (rng.next() % 0x1008)),
                // Stay inside the BAR plus a little: bounded to keep hits dense.
                _ => (MMIO, h.bar - MMIO + rng.next() % (BAR_SIZE + 16)),
            };
            // Never let garbage reset BAR decoding: it would only hide the BAR.
            if base == ECAM && (offset & 0xfff) < 0x40 {
                continue;
            }
            if rng.next() % 2 == 0 {
                h.root.read(base, offset, &mut data);
            } else {
                h.root.write(base, offset, &data);
            }
        }
    }
    assert_eq!(ecam_read(&mut h.root, SLOT, 0, 4), 0x1041_1af4);
}

#[test]
fn bad_queue_layouts_rejected() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let make = |sizes: Vec<u16>| {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let device = FakeDevice {
            virtio_type: 1,
            sizes,
            state,
        };
        VirtioPciDevice::new(
            Box::new(device),
            mem.clone(),
            Arc::new(RecordingSink::default()),
            Arc::new(RecordingRegistrar::default()),
        )
    };
    assert!(matches!(make(vec![]), Err(VirtioPciError::QueueCount(0))));
    assert!(matches!(
        make(vec![256; 256]),
        Err(VirtioPciError::QueueCount(256))
    ));
    assert!(matches!(
        make(vec![256, 100]),
        Err(VirtioPciError::QueueSize {
            index: 1,
            size: 100
        })
    ));
    assert!(make(vec![256; 255]).is_ok());
}

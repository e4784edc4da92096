//! Wiring the PCI root complex and the virtio-pci devices into the VM:
//! MSIs go to KVM with `KVM_SIGNAL_MSI`, queue doorbells become ioeventfds,
//! and device worker threads start under the device seccomp filter.

use std::sync::{Arc, Mutex};

use ferro_pci::{
    Bus, IoEventRegistrar, MsiMessage, MsiSink, PciRoot, PciRootLayout, VirtioPciDevice, ECAM_SIZE,
    PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_SIZE,
};
use ferro_virtio::block::{Block, BlockConfig};
use ferro_virtio::net::{Net, NetConfig};
use ferro_virtio::rng::Rng;
use ferro_virtio::vhost_user_blk::{VhostUserBlk, VhostUserBlkConfig, VhostUserBlkError};
use ferro_virtio::worker::WorkerOptions;
use ferro_virtio::VirtioDevice;
use kvm_bindings::kvm_msi;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout;
use crate::config::VmConfig;
use crate::seccomp::{self, ThreadKind};
use crate::GuestMemoryMmap;

/// Errors while creating PCI devices; each names the device.
#[derive(Debug, thiserror::Error)]
pub enum PciSetupError {
    /// The root complex could not be created or a slot assigned.
    #[error("cannot set up the PCI root complex")]
    Root(#[from] ferro_pci::RootError),
    /// A disk image could not be opened.
    #[error("cannot open disk {path}")]
    Disk {
        /// The image path.
        path: String,
        /// The cause.
        #[source]
        source: ferro_virtio::block::DiskError,
    },
    /// A vhost-user-blk backend could not be reached or set up.
    #[error("vhost-user-blk disk {0}")]
    VhostUserBlk(String, #[source] VhostUserBlkError),
    /// The TAP interface does not exist.
    #[error("TAP device {0} does not exist (create it first, e.g. `ip tuntap add dev {0} mode tap vnet_hdr`)")]
    NoTap(String),
    /// A TAP device could not be opened.
    #[error("cannot open TAP device {name}")]
    Tap {
        /// The TAP name.
        name: String,
        /// The cause.
        #[source]
        source: ferro_virtio::net::TapError,
    },
    /// The virtio-pci transport rejected a device.
    #[error("cannot create the virtio-pci transport for {0}")]
    Transport(String, #[source] ferro_pci::VirtioPciError),
    /// The root complex could not be placed on a bus.
    #[error("PCI address conflict")]
    Bus(#[from] ferro_pci::BusError),
}

/// Injects MSIs through `KVM_SIGNAL_MSI`.
struct KvmMsi(Arc<VmFd>);

impl MsiSink for KvmMsi {
    fn send(&self, msg: MsiMessage) -> std::io::Result<()> {
        let msi = kvm_msi {
            address_lo: msg.address as u32,
            address_hi: (msg.address >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        self.0
            .signal_msi(msi)
            .map(|_| ())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// Registers doorbell writes as KVM ioeventfds.
struct KvmIoEvents(Arc<VmFd>);

impl IoEventRegistrar for KvmIoEvents {
    fn register(&self, addr: u64, fd: &EventFd) -> std::io::Result<()> {
        self.0
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn unregister(&self, addr: u64, fd: &EventFd) -> std::io::Result<()> {
        self.0
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// The PCI devices of a VM, kept alive for its lifetime.
pub struct PciSetup {
    /// The root complex, also on the buses.
    pub root: Arc<Mutex<PciRoot>>,
}

fn worker_options(filters: &seccomp::Filters, kind: ThreadKind) -> WorkerOptions {
    if !filters.enabled() {
        return WorkerOptions::default();
    }
    let filter = filters.for_thread(kind);
    WorkerOptions::with_thread_init(Arc::new(move || {
        seccomp::apply(&filter).map_err(std::io::Error::other)
    }))
}

fn virtio_devices(
    cfg: &VmConfig,
    filters: &seccomp::Filters,
) -> Result<Vec<Box<dyn VirtioDevice>>, PciSetupError> {
    let opts = worker_options(filters, ThreadKind::Device);
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    // Started before any filter is installed (this runs in Vm::build), so
    // each connection thread holds only its own filter.
    let vhost_opts = worker_options(filters, ThreadKind::VhostUser);
    let vhost_user_blk = |v: &crate::config::VhostUserBlkConfig| {
        let config = VhostUserBlkConfig {
            id: v.id.clone(),
            socket: v.socket.clone(),
        };
        VhostUserBlk::new(config, vhost_opts.clone())
            .map(|b| Box::new(b) as Box<dyn VirtioDevice>)
            .map_err(|e| PciSetupError::VhostUserBlk(v.id.clone(), e))
    };
    // The boot disk first: a guest names disks in PCI order.
    for v in cfg.vhost_user_blks.iter().filter(|v| v.boot) {
        devices.push(vhost_user_blk(v)?);
    }
    for disk in &cfg.disks {
        let block = Block::new(
            BlockConfig {
                id: disk.id.clone().unwrap_or_default(),
                path: disk.path.clone(),
                read_only: disk.readonly,
            },
            opts.clone(),
        )
        .map_err(|source| PciSetupError::Disk {
            path: disk.path.display().to_string(),
            source,
        })?;
        devices.push(Box::new(block));
    }
    for v in cfg.vhost_user_blks.iter().filter(|v| !v.boot) {
        devices.push(vhost_user_blk(v)?);
    }
    for (i, (tap, mac)) in cfg.nets.iter().enumerate() {
        // The agent owns TAP lifetimes: the VMM attaches to an existing TAP
        // and never creates one (as root, TUNSETIFF would).
        if !std::path::Path::new("/sys/class/net").join(tap).exists() {
            return Err(PciSetupError::NoTap(tap.clone()));
        }
        let config = NetConfig {
            id: format!("net{i}"),
            tap_name: tap.clone(),
            mac: *mac,
        };
        let net = Net::new(config, opts.clone()).map_err(|source| PciSetupError::Tap {
            name: tap.clone(),
            source,
        })?;
        devices.push(Box::new(net));
    }
    devices.push(Box::new(Rng::new("rng0", opts)));
    Ok(devices)
}

/// Create the root complex and every configured device, and place the root
/// on the port I/O bus (0xcf8) and the MMIO bus (ECAM and the BAR window).
pub fn setup(
    cfg: &VmConfig,
    vm: &Arc<VmFd>,
    mem: &GuestMemoryMmap,
    filters: &seccomp::Filters,
    pio: &mut Bus,
    mmio: &mut Bus,
) -> Result<PciSetup, PciSetupError> {
    let mut root = PciRoot::new(PciRootLayout {
        io_base: PCI_CONFIG_IO_PORT,
        ecam_base: layout::PCI_ECAM_START,
        mmio_base: layout::PCI_MMIO_START,
        mmio_size: layout::PCI_MMIO_SIZE,
    })?;
    let msi: Arc<dyn MsiSink> = Arc::new(KvmMsi(vm.clone()));
    let ioevents: Arc<dyn IoEventRegistrar> = Arc::new(KvmIoEvents(vm.clone()));
    for device in virtio_devices(cfg, filters)? {
        let id = device.id().to_string();
        let transport = VirtioPciDevice::new(device, mem.clone(), msi.clone(), ioevents.clone())
            .map_err(|e| PciSetupError::Transport(id.clone(), e))?;
        let slot = root.add_device(Box::new(transport))?;
        tracing::info!(device = %id, slot, "virtio-pci device added");
    }
    let root = Arc::new(Mutex::new(root));
    pio.insert(PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_SIZE, root.clone())?;
    mmio.insert(layout::PCI_ECAM_START, ECAM_SIZE, root.clone())?;
    mmio.insert(layout::PCI_MMIO_START, layout::PCI_MMIO_SIZE, root.clone())?;
    Ok(PciSetup { root })
}

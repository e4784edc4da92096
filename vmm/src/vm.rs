//! Building and running one VM: KVM and guest memory, boot images, ACPI,
//! the buses and their devices, vCPU threads and the control socket.
//!
//! [`Vm::build`] is the boot sequence as named steps; [`Vm::run`] starts the
//! vCPUs and waits until the guest or the control socket ends the VM.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ferro_pci::Bus;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiConfig};
use crate::arch::boot::{self, ZeroPage};
use crate::arch::{cpuid, layout, regs};
use crate::config::{SerialSink, VmConfig};
use crate::control::{ControlServer, VmStatus};
use crate::devices::acpi_pm::AcpiPm;
use crate::devices::cmos::{self, Cmos};
use crate::devices::i8042::{self, I8042};
use crate::devices::serial::{ConsoleSink, SerialDevice};
use crate::devices::{ExitReason, ExitSignal};
use crate::pci::{self, PciSetup};
use crate::seccomp::{self, ThreadKind};
use crate::vcpu::{self, ExitHandler, RunState, VcpuControl};
use crate::GuestMemoryMmap;

/// Errors while building or running a VM. Each names what failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm (is KVM enabled and are you allowed to use it?)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    /// A KVM capability the VMM needs is missing.
    #[error("KVM lacks a required capability: {0}")]
    KvmCap(&'static str),
    /// A KVM VM-level ioctl failed.
    #[error("KVM failed to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be allocated.
    #[error("cannot allocate {0} MiB of guest memory")]
    Memory(u64, #[source] vm_memory::mmap::FromRangesError),
    /// Loading the kernel, initrd or command line failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// SMBIOS tables could not be written.
    #[error(transparent)]
    Smbios(#[from] crate::smbios::SmbiosError),
    /// vCPU registers could not be set.
    #[error("cannot set up vCPU {0}")]
    Regs(u8, #[source] regs::RegsError),
    /// The serial console file could not be opened.
    #[error("cannot open serial console file {0}")]
    SerialFile(String, #[source] std::io::Error),
    /// A device could not be created.
    #[error(transparent)]
    Pci(#[from] pci::PciSetupError),
    /// An eventfd, thread or signal could not be created.
    #[error("cannot create {0}")]
    Os(&'static str, #[source] std::io::Error),
    /// A bus range collided (a bug in the layout).
    #[error("device layout conflict")]
    Bus(#[from] ferro_pci::BusError),
    /// The control socket could not be opened.
    #[error("cannot open control socket {0}")]
    Control(String, #[source] std::io::Error),
    /// A seccomp filter could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
}

type Result<T> = std::result::Result<T, VmError>;

/// A built VM, ready to run.
pub struct Vm {
    vm_fd: Arc<VmFd>,
    _mem: GuestMemoryMmap,
    vcpus: Vec<VcpuFd>,
    handler: Arc<ExitHandler>,
    exit: ExitSignal,
    i8042: Arc<Mutex<I8042>>,
    first_output: Arc<AtomicBool>,
    control_path: Option<std::path::PathBuf>,
    filters: seccomp::Filters,
    _pci: PciSetup,
}

fn open_kvm() -> Result<(Kvm, VmFd)> {
    let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
    for (cap, name) in [
        (Cap::Irqchip, "in-kernel irqchip"),
        (Cap::Ioeventfd, "ioeventfd"),
        (Cap::Irqfd, "irqfd"),
        (Cap::SignalMsi, "MSI injection"),
        (Cap::UserMemory, "user memory"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::KvmCap(name));
        }
    }
    let vm = kvm
        .create_vm()
        .map_err(|e| VmError::Kvm("create a VM", e))?;
    vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
        .map_err(|e| VmError::Kvm("set the TSS address", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmError::Kvm("create the irqchip", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmError::Kvm("create the PIT", e))?;
    Ok((kvm, vm))
}

/// Huge-page size the guest RAM is aligned to.
const RAM_ALIGN: usize = 2 << 20;

/// A mapping of `len` bytes whose start is 2 MiB aligned and marked for
/// transparent huge pages: private anonymous memory, or `file` shared (a
/// memfd, so a vhost-user backend can map the same pages). KVM maps guest
/// memory with 2 MiB EPT/NPT entries only where the guest-physical and
/// host-virtual addresses agree modulo 2 MiB and the host page is huge: an
/// unaligned mapping costs every guest TLB miss a 4 KiB walk (measured under
/// nesting: Linux booted ~1.7 times slower, at every step). The mapping
/// lives as long as the process (one VM per process); the kernel frees it
/// at exit.
fn map_ram(len: usize, file: Option<&std::fs::File>) -> std::io::Result<*mut u8> {
    use std::os::fd::AsRawFd;
    let total = len + RAM_ALIGN;
    // SAFETY: a new private anonymous mapping at an address the kernel
    // picks; nothing else refers to it.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let base = raw as usize;
    let start = (base + RAM_ALIGN - 1) & !(RAM_ALIGN - 1);
    let (head, tail) = (start - base, total - (start - base) - len);
    // SAFETY: both ranges are the unused ends of the mapping made above;
    // munmap of a zero-length range is skipped.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
    }
    if let Some(file) = file {
        // SAFETY: MAP_FIXED replaces exactly `start..start+len`, the part of
        // our own fresh reservation kept above, with the memfd's pages.
        let shared = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if shared == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
    }
    // SAFETY: advice on our own mapping only: where THP is "madvise" this
    // asks for huge pages; an error (THP disabled) changes nothing.
    unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    Ok(start as *mut u8)
}

/// A memfd of `len` bytes holding one region of guest RAM.
fn ram_memfd(len: usize) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: the name is a NUL-terminated literal; the call only returns
    // a new descriptor or an error.
    let fd = unsafe { libc::memfd_create(c"ferro-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len as u64)?;
    Ok(file)
}

/// One region of guest RAM at `gpa`, in a memfd when `shared`.
fn ram_region(
    gpa: GuestAddress,
    len: usize,
    shared: bool,
) -> Result<vm_memory::GuestRegionMmap<()>> {
    let os = |e| VmError::Os("guest memory", e);
    let file = shared.then(|| ram_memfd(len)).transpose().map_err(os)?;
    let ptr = map_ram(len, file.as_ref()).map_err(os)?;
    let (flags, file_offset) = match file {
        Some(f) => (libc::MAP_SHARED, Some(vm_memory::FileOffset::new(f, 0))),
        None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None),
    };
    let mut builder = vm_memory::mmap::MmapRegionBuilder::new(len)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags | libc::MAP_NORESERVE);
    if let Some(fo) = file_offset {
        builder = builder.with_file_offset(fo);
    }
    // SAFETY: `ptr..ptr+len` is the live mapping made just above, used for
    // nothing else, and never unmapped while the process runs.
    let region = unsafe { builder.with_raw_mmap_pointer(ptr) }
        .build()
        .map_err(|e| os(std::io::Error::other(e)))?;
    vm_memory::GuestRegionMmap::new(region, gpa)
        .ok_or_else(|| os(std::io::Error::other("region overflows")))
}

/// Guest RAM registered with KVM; in memfds when `shared` (vhost-user
/// devices map it), anonymous otherwise.
fn create_memory(vm: &VmFd, mib: u64, shared: bool) -> Result<GuestMemoryMmap> {
    let regions = boot::ram_ranges(mib << 20)
        .into_iter()
        .map(|(gpa, len)| ram_region(gpa, len, shared))
        .collect::<Result<Vec<_>>>()?;
    let mem = GuestMemoryMmap::from_regions(regions)
        .map_err(|e| VmError::Memory(mib, vm_memory::mmap::FromRangesError::from(e)))?;
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: mem
                .get_host_address(region.start_addr())
                .expect("region start is in memory") as u64,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which the Vm keeps
        // for as long as the KVM VM exists; regions do not overlap.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| VmError::Kvm("register guest memory", e))?;
    }
    Ok(mem)
}

fn console_sink(sink: &SerialSink, first_output: Arc<AtomicBool>) -> Result<ConsoleSink> {
    let out: Box<dyn Write + Send> = match sink {
        SerialSink::Stdout => Box::new(std::io::stdout()),
        SerialSink::Null => Box::new(std::io::sink()),
        SerialSink::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| VmError::SerialFile(path.display().to_string(), e))?,
        ),
    };
    Ok(ConsoleSink::new(out, first_output))
}

fn irqfd(vm: &VmFd, gsi: u32) -> Result<EventFd> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Os("an eventfd", e))?;
    vm.register_irqfd(&evt, gsi)
        .map_err(|e| VmError::Kvm("register an irqfd", e))?;
    Ok(evt)
}

fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    cfg: &VmConfig,
    entry: GuestAddress,
) -> Result<Vec<VcpuFd>> {
    let base_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VmError::Kvm("read supported CPUID", e))?;
    (0..cfg.vcpus)
        .map(|i| {
            let vcpu = vm
                .create_vcpu(u64::from(i))
                .map_err(|e| VmError::Kvm("create a vCPU", e))?;
            let mut id = base_cpuid.clone();
            cpuid::filter(&mut id, i, cfg.vcpus);
            vcpu.set_cpuid2(&id)
                .map_err(|e| VmError::Kvm("set CPUID", e))?;
            let r = |e| VmError::Regs(i, e);
            regs::setup_msrs(&vcpu).map_err(r)?;
            regs::setup_fpu(&vcpu).map_err(r)?;
            regs::setup_lint(&vcpu).map_err(r)?;
            if i == 0 {
                regs::setup_sregs(mem, &vcpu).map_err(r)?;
                regs::setup_regs(&vcpu, entry).map_err(r)?;
            }
            Ok(vcpu)
        })
        .collect()
}

impl Vm {
    /// Create everything the VM needs; nothing runs yet.
    pub fn build(cfg: &VmConfig) -> Result<Self> {
        let (kvm, vm_fd) = open_kvm()?;
        let vm_fd = Arc::new(vm_fd);
        let mem = create_memory(&vm_fd, cfg.memory_mib, !cfg.vhost_user_blks.is_empty())?;

        let kernel = boot::load_kernel(&mem, &cfg.kernel)?;
        let initrd = match &cfg.initrd {
            Some(p) => Some(boot::load_initrd(&mem, p, &kernel)?),
            None => None,
        };
        let cmdline = boot::build_cmdline(&cfg.cmdline)?;
        let exit = ExitSignal::new().map_err(|e| VmError::Os("an eventfd", e))?;

        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let first_output = Arc::new(AtomicBool::new(false));
        let serial = SerialDevice::new(
            irqfd(&vm_fd, layout::COM1_IRQ)?,
            console_sink(&cfg.serial, first_output.clone())?,
        );
        pio.insert(
            u64::from(layout::COM1_PORT),
            8,
            Arc::new(Mutex::new(serial)),
        )?;
        let kbd = Arc::new(Mutex::new(I8042::new(
            exit.clone(),
            irqfd(&vm_fd, layout::I8042_IRQ)?,
        )));
        pio.insert(u64::from(i8042::DATA_PORT), 1, kbd.clone())?;
        pio.insert(u64::from(i8042::COMMAND_PORT), 1, kbd.clone())?;
        pio.insert(
            u64::from(cmos::INDEX_PORT),
            2,
            Arc::new(Mutex::new(Cmos::new())),
        )?;
        let pm = Arc::new(Mutex::new(AcpiPm::new(exit.clone())));
        for (port, len) in AcpiPm::RANGES {
            pio.insert(u64::from(port), u64::from(len), pm.clone())?;
        }
        let filters = seccomp::Filters::build(cfg.seccomp)?;
        let pci = pci::setup(cfg, &vm_fd, &mem, &filters, &mut pio, &mut mmio)?;

        let rsdp = acpi::write_tables(
            &mem,
            &AcpiConfig {
                vcpus: cfg.vcpus,
                pci_mmio: (layout::PCI_MMIO_START, layout::PCI_MMIO_SIZE),
                ecam_base: layout::PCI_ECAM_START,
            },
        )?;
        let zp = ZeroPage {
            kernel: &kernel,
            cmdline_len: cfg.cmdline.len(),
            initrd,
            rsdp,
        };
        boot::write_zero_page(&mem, &cmdline, &zp)?;
        boot::write_reset_stub(&mem)?;
        crate::smbios::write(&mem, cfg.system_uuid.as_ref())?;
        let vcpus = create_vcpus(&kvm, &vm_fd, &mem, cfg, kernel.entry)?;

        Ok(Self {
            vm_fd,
            _mem: mem,
            vcpus,
            handler: Arc::new(ExitHandler::new(Arc::new(pio), Arc::new(mmio))),
            exit,
            i8042: kbd,
            first_output,
            control_path: cfg.control_socket.clone(),
            filters,
            _pci: pci,
        })
    }

    /// Run until the guest resets or powers off, or the control socket stops
    /// it. Returns why the VM ended.
    pub fn run(self) -> Result<ExitReason> {
        let control = Arc::new(VcpuControl::default());
        vcpu::register_kick_handler()
            .map_err(|e| VmError::Os("the vCPU kick signal handler", e))?;
        let filters = &self.filters;
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for (i, fd) in self.vcpus.into_iter().enumerate() {
            let (handler, control, exit) =
                (self.handler.clone(), control.clone(), self.exit.clone());
            let filter = filters.for_thread(ThreadKind::Vcpu);
            let t = std::thread::Builder::new()
                .name(format!("fc_vcpu{i}"))
                .spawn(move || {
                    if let Err(e) = seccomp::apply(&filter) {
                        tracing::error!(error = %e, "cannot install vCPU seccomp filter");
                        exit.request(ExitReason::Error);
                        return;
                    }
                    vcpu::run_loop(i as u8, fd, handler, control, exit)
                })
                .map_err(|e| VmError::Os("a vCPU thread", e))?;
            threads.push(t);
        }
        let status = Arc::new(VmStatus::new(
            control.clone(),
            self.first_output.clone(),
            self.i8042.clone(),
            self.exit.clone(),
            threads
                .iter()
                .map(|t| {
                    use std::os::unix::thread::JoinHandleExt;
                    t.as_pthread_t()
                })
                .collect(),
        ));
        if let Some(path) = &self.control_path {
            let server = ControlServer::bind(path, status.clone())
                .map_err(|e| VmError::Control(path.display().to_string(), e))?;
            let filter = filters.for_thread(ThreadKind::Control);
            std::thread::Builder::new()
                .name("fc_control".into())
                .spawn(move || {
                    if seccomp::apply(&filter).is_ok() {
                        server.serve();
                    }
                })
                .map_err(|e| VmError::Os("the control thread", e))?;
        }
        seccomp::apply(&filters.for_thread(ThreadKind::Main))?;
        // Wait for the first exit request.
        while self.exit.reason().is_none() {
            let _ = self.exit.eventfd().read();
        }
        let reason = match self.exit.reason().unwrap_or(ExitReason::Error) {
            ExitReason::Reset if status.shutdown_asked() => ExitReason::Stopped,
            r => r,
        };
        if let Some(stats) = self.handler.stats() {
            eprintln!("ferro-vmm: {}", stats.summary());
        }
        status.set_stopped();
        status.drain(std::time::Duration::from_secs(2));
        control.set(RunState::Exiting);
        status.kick_all();
        drop(self.vm_fd);
        Ok(reason)
    }
}

//! vCPU threads: a pure exit handler (port I/O and MMIO dispatch, reset and
//! shutdown) and a small run/pause/exit state machine driven by the control
//! socket. A paused or exiting vCPU is kicked out of `KVM_RUN` with a
//! real-time signal whose handler sets `immediate_exit`.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex};

use ferro_pci::Bus;
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::{ExitReason, ExitSignal};
use crate::exitstats::ExitStats;
use ferro_virtio::ratelimit::LogRateLimiter;
use ferro_virtio::warn_ratelimited;

/// What the run loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum VcpuAction {
    /// Re-enter the guest.
    Continue,
    /// The guest asked to reset or power off, or an error ended the VM.
    Stop(ExitReason),
}

/// Dispatches exits to the buses. Holds no per-vCPU state, so one handler is
/// shared by all vCPUs and tests feed it exits directly.
pub struct ExitHandler {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    unhandled: LogRateLimiter,
    stats: Option<ExitStats>,
}

impl ExitHandler {
    /// A handler over the port I/O and MMIO buses.
    pub fn new(pio: Arc<Bus>, mmio: Arc<Bus>) -> Self {
        Self {
            pio,
            mmio,
            unhandled: LogRateLimiter::default(),
            stats: ExitStats::from_env(),
        }
    }

    /// The exit counters, when `FERRO_VMM_EXIT_STATS=1` enabled them.
    pub fn stats(&self) -> Option<&ExitStats> {
        self.stats.as_ref()
    }

    fn count(&self, exit: &VcpuExit) {
        let Some(s) = &self.stats else { return };
        match exit {
            VcpuExit::IoIn(port, _) | VcpuExit::IoOut(port, _) => s.pio(*port),
            VcpuExit::MmioRead(addr, _) | VcpuExit::MmioWrite(addr, _) => s.mmio(*addr),
            VcpuExit::Hlt => s.hlt(),
            _ => s.other(),
        }
    }

    /// A port read: unclaimed ports float high, as on real hardware.
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        if !self.pio.read(u64::from(port), data) {
            data.fill(0xff);
        }
    }

    /// A port write; unclaimed ports (POST codes, probes) are ignored.
    pub fn io_out(&self, port: u16, data: &[u8]) {
        self.pio.write(u64::from(port), data);
    }

    /// An MMIO read outside RAM and the in-kernel devices.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) {
            data.fill(0xff);
            warn_ratelimited!(
                self.unhandled,
                addr,
                len = data.len(),
                "guest read unmapped MMIO"
            );
        }
    }

    /// An MMIO write outside RAM and the in-kernel devices.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !self.mmio.write(addr, data) {
            warn_ratelimited!(
                self.unhandled,
                addr,
                len = data.len(),
                "guest wrote unmapped MMIO"
            );
        }
    }

    /// Decide what an exit means.
    pub fn handle(&self, index: u8, exit: VcpuExit) -> VcpuAction {
        self.count(&exit);
        match exit {
            VcpuExit::IoIn(port, data) => self.io_in(port, data),
            VcpuExit::IoOut(port, data) => self.io_out(port, data),
            VcpuExit::MmioRead(addr, data) => self.mmio_read(addr, data),
            VcpuExit::MmioWrite(addr, data) => self.mmio_write(addr, data),
            VcpuExit::Hlt => {}
            VcpuExit::Shutdown => {
                tracing::info!(vcpu = index, "guest triple-faulted: treated as reset");
                return VcpuAction::Stop(ExitReason::Reset);
            }
            VcpuExit::SystemEvent(kind, _) => {
                tracing::info!(vcpu = index, kind, "guest system event");
                return VcpuAction::Stop(ExitReason::Reset);
            }
            VcpuExit::FailEntry(reason, cpu) => {
                tracing::error!(vcpu = index, reason, cpu, "KVM failed to enter the guest");
                return VcpuAction::Stop(ExitReason::Error);
            }
            VcpuExit::InternalError => {
                tracing::error!(vcpu = index, "KVM internal error (emulation failure)");
                return VcpuAction::Stop(ExitReason::Error);
            }
            other => {
                tracing::error!(vcpu = index, exit = ?other, "unexpected vCPU exit");
                return VcpuAction::Stop(ExitReason::Error);
            }
        }
        VcpuAction::Continue
    }
}

/// The state every vCPU follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Run the guest.
    Running,
    /// Park outside `KVM_RUN` until resumed.
    Paused,
    /// Leave the run loop.
    Exiting,
}

/// Shared run state plus how many vCPUs are parked.
pub struct VcpuControl {
    state: Mutex<(RunState, usize)>,
    cv: Condvar,
}

impl Default for VcpuControl {
    fn default() -> Self {
        Self {
            state: Mutex::new((RunState::Running, 0)),
            cv: Condvar::new(),
        }
    }
}

impl VcpuControl {
    /// Set the state vCPUs must follow.
    pub fn set(&self, state: RunState) {
        self.state.lock().expect("vcpu control poisoned").0 = state;
        self.cv.notify_all();
    }

    /// The current target state.
    pub fn get(&self) -> RunState {
        self.state.lock().expect("vcpu control poisoned").0
    }

    /// Wait until `n` vCPUs are parked (or the VM is exiting).
    pub fn wait_parked(&self, n: usize) {
        let guard = self.state.lock().expect("vcpu control poisoned");
        let _unused = self
            .cv
            .wait_while(guard, |(s, parked)| *s == RunState::Paused && *parked < n)
            .expect("vcpu control poisoned");
    }

    /// Called by a vCPU thread between runs; returns false when it must exit.
    fn checkpoint(&self) -> bool {
        let mut guard = self.state.lock().expect("vcpu control poisoned");
        if guard.0 == RunState::Paused {
            guard.1 += 1;
            self.cv.notify_all();
            guard = self
                .cv
                .wait_while(guard, |(s, _)| *s == RunState::Paused)
                .expect("vcpu control poisoned");
            guard.1 -= 1;
        }
        guard.0 != RunState::Exiting
    }
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal's handler: make the current (or next) `KVM_RUN` return.
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer was set by this thread to its own vCPU's
        // `kvm_run` mapping, which lives as long as the thread's `VcpuFd`;
        // a byte store is async-signal-safe.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// The real-time signal used to kick vCPUs.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Install the kick handler (once per process).
pub fn register_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// The body of a vCPU thread: run until the guest or the control socket
/// ends the VM, then signal `exit`.
pub fn run_loop(
    index: u8,
    mut vcpu: VcpuFd,
    handler: Arc<ExitHandler>,
    control: Arc<VcpuControl>,
    exit: ExitSignal,
) {
    KVM_RUN.with(|r| r.set(vcpu.get_kvm_run() as *mut kvm_run));
    let _span = tracing::info_span!("vcpu", index).entered();
    while control.checkpoint() {
        let action = match vcpu.run() {
            Ok(e) => handler.handle(index, e),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                VcpuAction::Continue
            }
            Err(e) => {
                tracing::error!(error = %e, "KVM_RUN failed");
                VcpuAction::Stop(ExitReason::Error)
            }
        };
        if let VcpuAction::Stop(reason) = action {
            exit.request(reason);
            control.set(RunState::Exiting);
            break;
        }
    }
    KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl ferro_pci::BusDevice for Recorder {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 1);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.0.push((base + offset, data.to_vec()));
        }
    }

    fn handler() -> (ExitHandler, Arc<StdMutex<Recorder>>) {
        let rec = Arc::new(StdMutex::new(Recorder(Vec::new())));
        let mut pio = Bus::new();
        pio.insert(0x3f8, 8, rec.clone()).unwrap();
        let mut mmio = Bus::new();
        mmio.insert(0xd000_0000, 0x1000, rec.clone()).unwrap();
        (ExitHandler::new(Arc::new(pio), Arc::new(mmio)), rec)
    }

    #[test]
    fn port_and_mmio_dispatch() {
        let (h, rec) = handler();
        let mut b = [0u8; 1];
        assert_eq!(
            h.handle(0, VcpuExit::IoIn(0x3f9, &mut b)),
            VcpuAction::Continue
        );
        assert_eq!(b, [2]);
        h.handle(0, VcpuExit::IoOut(0x3f8, b"x"));
        h.handle(0, VcpuExit::MmioWrite(0xd000_0010, &[1, 2, 3, 4]));
        assert_eq!(
            rec.lock().unwrap().0,
            vec![(0x3f8, b"x".to_vec()), (0xd000_0010, vec![1, 2, 3, 4])]
        );
    }

    #[test]
    fn unclaimed_reads_float_high() {
        let (h, _) = handler();
        let mut b = [0u8; 4];
        h.handle(0, VcpuExit::IoIn(0x70, &mut b));
        assert_eq!(b, [0xff; 4]);
        let mut b = [0u8; 8];
        h.handle(0, VcpuExit::MmioRead(0x1234_0000, &mut b));
        assert_eq!(b, [0xff; 8]);
    }

    #[test]
    fn shutdown_and_errors_stop() {
        let (h, _) = handler();
        assert_eq!(
            h.handle(0, VcpuExit::Shutdown),
            VcpuAction::Stop(ExitReason::Reset)
        );
        assert_eq!(
            h.handle(1, VcpuExit::InternalError),
            VcpuAction::Stop(ExitReason::Error)
        );
    }

    #[test]
    fn pause_parks_and_resume_releases() {
        let control = Arc::new(VcpuControl::default());
        control.set(RunState::Paused);
        let c = control.clone();
        let t = std::thread::spawn(move || c.checkpoint());
        control.wait_parked(1);
        control.set(RunState::Running);
        assert!(t.join().unwrap());
        control.set(RunState::Exiting);
        assert!(!control.checkpoint());
    }
}

//! Seccomp filters: every VMM thread runs under an allowlist of the system
//! calls it needs, built with `seccompiler`. `ioctl` is allowed only for the
//! request numbers the running VM uses. A blocked call raises SIGSYS, whose
//! handler names the call on stderr and ends the process (status 159), so a
//! compromised or buggy thread never continues past a forbidden call.

use std::collections::BTreeMap;
use std::sync::Arc;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors while building or installing filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be compiled.
    #[error("cannot build seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    /// The compiled filter was rejected.
    #[error("cannot compile seccomp filter")]
    Compile(#[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("cannot install seccomp filter")]
    Apply(#[source] seccompiler::Error),
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

/// Which thread a filter is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread, waiting for the VM to end.
    Main,
    /// A vCPU thread (also activates devices and spawns their workers).
    Vcpu,
    /// A device worker thread.
    Device,
    /// The control socket thread.
    Control,
    /// A vhost-user device's connection thread: a device worker that also
    /// talks to its backend and reconnects to it.
    VhostUser,
}

/// `ioctl` requests the VMM issues after boot (from the kernel UAPI headers).
mod ioctl_nr {
    /// `_IO(KVMIO, 0x80)`
    pub const KVM_RUN: u64 = 0xae80;
    /// `_IOW(KVMIO, 0xa5, struct kvm_msi)`
    pub const KVM_SIGNAL_MSI: u64 = 0x4020_aea5;
    /// `_IOW(KVMIO, 0x79, struct kvm_ioeventfd)`
    pub const KVM_IOEVENTFD: u64 = 0x4040_ae79;
    /// `_IOW(KVMIO, 0x76, struct kvm_irqfd)`
    pub const KVM_IRQFD: u64 = 0x4020_ae76;
    /// `_IOW('T', 208, unsigned int)`
    pub const TUNSETOFFLOAD: u64 = 0x4004_54d0;
    /// `_IOW('T', 216, int)`
    pub const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;
    /// `FIONBIO`
    pub const FIONBIO: u64 = 0x5421;
}

const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_fcntl,
];

/// What device workers and the vCPUs that start them also need.
const DEVICE: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_getrandom,
    libc::SYS_epoll_create1,
    libc::SYS_eventfd2,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_rt_sigaction,
    libc::SYS_sched_setaffinity,
    libc::SYS_getrlimit,
    libc::SYS_prlimit64,
    libc::SYS_uname,
    // Workers started by a vCPU stack their own (stricter) filter; a
    // filter can only ever narrow what is allowed.
    libc::SYS_seccomp,
];

const CONTROL: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_accept,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
];

/// What a vhost-user connection thread needs beyond a device worker:
/// messages with file descriptors (`SCM_RIGHTS`: memfds, eventfds) and,
/// to reconnect a restarted backend, a new Unix socket (`socket` is allowed
/// for `AF_UNIX` only, see [`rules`]).
const VHOST_USER: &[i64] = &[
    libc::SYS_connect,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
];

fn ioctl_rule(requests: &[u64]) -> Result<Vec<SeccompRule>, SeccompError> {
    requests
        .iter()
        .map(|nr| {
            let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *nr)
                .map_err(SeccompError::Build)?;
            SeccompRule::new(vec![cond]).map_err(SeccompError::Build)
        })
        .collect()
}

/// The allowlist for a kind of thread.
pub fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    use ioctl_nr::*;
    let mut calls: Vec<i64> = COMMON.to_vec();
    let ioctls: &[u64] = match kind {
        ThreadKind::Main => &[],
        ThreadKind::Control => {
            calls.extend_from_slice(CONTROL);
            &[FIONBIO]
        }
        ThreadKind::Vcpu | ThreadKind::Device | ThreadKind::VhostUser => {
            calls.extend_from_slice(DEVICE);
            if kind == ThreadKind::VhostUser {
                calls.extend_from_slice(VHOST_USER);
            }
            &[
                KVM_RUN,
                KVM_SIGNAL_MSI,
                KVM_IOEVENTFD,
                KVM_IRQFD,
                TUNSETOFFLOAD,
                TUNSETVNETHDRSZ,
                FIONBIO,
            ]
        }
    };
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = calls.into_iter().map(|c| (c, vec![])).collect();
    if !ioctls.is_empty() {
        map.insert(libc::SYS_ioctl, ioctl_rule(ioctls)?);
    }
    if kind == ThreadKind::VhostUser {
        let unix = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AF_UNIX as u64,
        )
        .map_err(SeccompError::Build)?;
        map.insert(
            libc::SYS_socket,
            vec![SeccompRule::new(vec![unix]).map_err(SeccompError::Build)?],
        );
    }
    Ok(map)
}

fn compile(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules(kind)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(SeccompError::Build)?;
    filter.try_into().map_err(SeccompError::Compile)
}

/// Compiled filters for each kind of thread (empty when disabled).
pub struct Filters {
    enabled: bool,
    main: Arc<BpfProgram>,
    vcpu: Arc<BpfProgram>,
    device: Arc<BpfProgram>,
    control: Arc<BpfProgram>,
    vhost_user: Arc<BpfProgram>,
}

impl Filters {
    /// Compile all filters (or none when `enabled` is false) and install the
    /// SIGSYS handler.
    pub fn build(enabled: bool) -> Result<Self, SeccompError> {
        if !enabled {
            let empty = Arc::new(BpfProgram::new());
            return Ok(Self {
                enabled,
                main: empty.clone(),
                vcpu: empty.clone(),
                device: empty.clone(),
                control: empty.clone(),
                vhost_user: empty,
            });
        }
        vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, sigsys_handler)
            .map_err(|e| SeccompError::Handler(std::io::Error::from_raw_os_error(e.errno())))?;
        Ok(Self {
            enabled,
            main: Arc::new(compile(ThreadKind::Main)?),
            vcpu: Arc::new(compile(ThreadKind::Vcpu)?),
            device: Arc::new(compile(ThreadKind::Device)?),
            control: Arc::new(compile(ThreadKind::Control)?),
            vhost_user: Arc::new(compile(ThreadKind::VhostUser)?),
        })
    }

    /// Whether filters are installed at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The filter for `kind`.
    pub fn for_thread(&self, kind: ThreadKind) -> Arc<BpfProgram> {
        match kind {
            ThreadKind::Main => self.main.clone(),
            ThreadKind::Vcpu => self.vcpu.clone(),
            ThreadKind::Device => self.device.clone(),
            ThreadKind::Control => self.control.clone(),
            ThreadKind::VhostUser => self.vhost_user.clone(),
        }
    }
}

/// Install `filter` on the calling thread (a no-op for an empty filter).
pub fn apply(filter: &BpfProgram) -> Result<(), SeccompError> {
    if filter.is_empty() {
        return Ok(());
    }
    seccompiler::apply_filter(filter).map_err(SeccompError::Apply)
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // The blocked syscall number is `si_syscall`, an int at offset 24 of
    // siginfo_t on x86-64 for SIGSYS.
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler.
    let nr = unsafe { *((info as *const u8).add(24) as *const libc::c_int) };
    let mut msg = *b"ferro-vmm: seccomp blocked syscall       \n";
    let mut n = nr.unsigned_abs();
    let mut pos = msg.len() - 2;
    loop {
        msg[pos] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || pos == 35 {
            break;
        }
        pos -= 1;
    }
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is valid.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(159);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn iow(ty: u64, nr: u64, size: u64) -> u64 {
        (1 << 30) | (size << 16) | (ty << 8) | nr
    }

    #[test]
    fn ioctl_numbers_match_uapi() {
        use ioctl_nr::*;
        let kvm_msi = std::mem::size_of::<kvm_bindings::kvm_msi>() as u64;
        let kvm_ioeventfd = std::mem::size_of::<kvm_bindings::kvm_ioeventfd>() as u64;
        let kvm_irqfd = std::mem::size_of::<kvm_bindings::kvm_irqfd>() as u64;
        assert_eq!(KVM_SIGNAL_MSI, iow(0xae, 0xa5, kvm_msi));
        assert_eq!(KVM_IOEVENTFD, iow(0xae, 0x79, kvm_ioeventfd));
        assert_eq!(KVM_IRQFD, iow(0xae, 0x76, kvm_irqfd));
        assert_eq!(TUNSETOFFLOAD, iow(b'T' as u64, 208, 4));
        assert_eq!(TUNSETVNETHDRSZ, iow(b'T' as u64, 216, 4));
    }

    #[test]
    fn filters_compile_for_every_thread() {
        for kind in [
            ThreadKind::Main,
            ThreadKind::Vcpu,
            ThreadKind::Device,
            ThreadKind::Control,
            ThreadKind::VhostUser,
        ] {
            let prog = compile(kind).unwrap();
            assert!(!prog.is_empty());
        }
        assert!(!rules(ThreadKind::Main)
            .unwrap()
            .contains_key(&libc::SYS_ioctl));
        assert!(!rules(ThreadKind::Vcpu)
            .unwrap()
            .contains_key(&libc::SYS_execve));
        assert!(!rules(ThreadKind::Device)
            .unwrap()
            .contains_key(&libc::SYS_openat));
    }

    #[test]
    fn a_filtered_thread_is_stopped_at_a_forbidden_call() {
        // Installing a filter is per thread: use a child process so the test
        // runner survives. The child blocks openat and then tries it.
        // SAFETY: fork in a test; the child only makes raw syscalls and exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let prog = compile(ThreadKind::Device).unwrap();
            vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, sigsys_handler).unwrap();
            apply(&prog).unwrap();
            // SAFETY: a raw syscall with a valid NUL-terminated path.
            unsafe { libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/".as_ptr(), 0) };
            // SAFETY: reached only if the call was allowed.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status));
        assert_eq!(libc::WEXITSTATUS(status), 159);
    }
}

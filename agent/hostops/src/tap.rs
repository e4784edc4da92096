//! Persistent TAP devices and Linux bridges, managed with ioctls.
//!
//! A TAP device is created persistent (it outlives the fd that created it)
//! with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, the flags the VMM opens it
//! with later. Bridges are plain Linux bridges. State is read back from
//! `/sys/class/net`, so the caller must be in the network namespace sysfs
//! was mounted in (the agent runs in the host's root namespace).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::names;

const TUN_DEVICE: &str = "/dev/net/tun";
const SYS_CLASS_NET: &str = "/sys/class/net";

/// Flags every TAP device is created and opened with.
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

// Socket ioctls from <linux/sockios.h>, typed for `libc::ioctl`.
const SIOCGIFFLAGS: libc::Ioctl = 0x8913;
const SIOCSIFFLAGS: libc::Ioctl = 0x8914;
const SIOCGIFINDEX: libc::Ioctl = 0x8933;
const SIOCBRADDBR: libc::Ioctl = 0x89a0;
const SIOCBRDELBR: libc::Ioctl = 0x89a1;
const SIOCBRADDIF: libc::Ioctl = 0x89a2;
const SIOCBRDELIF: libc::Ioctl = 0x89a3;

/// Errors of TAP and bridge operations.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is not 1..=15 characters of `[A-Za-z0-9_.-]`.
    #[error("invalid interface name {0:?}: expected 1 to 15 characters of [A-Za-z0-9_.-]")]
    InvalidName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("failed to open {TUN_DEVICE}")]
    OpenTun(#[source] io::Error),
    /// The control socket for interface ioctls could not be created.
    #[error("failed to create a control socket for interface {0}")]
    Socket(String, #[source] io::Error),
    /// An ioctl on an interface failed.
    #[error("{op} failed for interface {name}")]
    Ioctl {
        /// The ioctl, e.g. `TUNSETIFF`.
        op: &'static str,
        /// Interface concerned.
        name: String,
        /// Underlying error (`EBUSY` from `TUNSETIFF`: the device is in use).
        #[source]
        source: io::Error,
    },
    /// The interface does not exist.
    #[error("interface {0} not found")]
    NotFound(String),
    /// The interface exists but is not a TAP device.
    #[error("interface {0} exists but is not a TAP device")]
    NotTap(String),
    /// The interface exists but is not a bridge.
    #[error("interface {0} exists but is not a bridge")]
    NotBridge(String),
    /// The interface is already a port of another bridge.
    #[error("interface {name} is already attached to bridge {bridge}")]
    AttachedElsewhere {
        /// Interface being attached.
        name: String,
        /// Bridge it is attached to.
        bridge: String,
    },
}

/// Creates the persistent TAP device `name` and brings it up.
///
/// Idempotent: an existing TAP device of that name is only brought up (and
/// not opened, so a VMM using it is undisturbed). Fails with
/// [`TapError::NotTap`] if another kind of interface has the name.
pub fn create_tap(name: &str) -> Result<(), TapError> {
    check_name(name)?;
    if interface_exists(name) {
        if !tap_exists(name) {
            return Err(TapError::NotTap(name.to_string()));
        }
        return set_up(name, true);
    }
    let queue = open_tap_queue(name)?;
    set_persist(&queue, name, true)?;
    drop(queue);
    if let Err(e) = set_up(name, true) {
        let _ = delete_tap(name);
        return Err(e);
    }
    tracing::info!(tap = name, "tap created");
    Ok(())
}

/// Deletes the persistent TAP device `name`.
///
/// Idempotent: succeeds if no interface has the name. Fails with an
/// `EBUSY` [`TapError::Ioctl`] while a process (the VMM) still holds it
/// open, and with [`TapError::NotTap`] for another kind of interface.
pub fn delete_tap(name: &str) -> Result<(), TapError> {
    check_name(name)?;
    if !interface_exists(name) {
        return Ok(());
    }
    if !tap_exists(name) {
        return Err(TapError::NotTap(name.to_string()));
    }
    let queue = open_tap_queue(name)?;
    set_persist(&queue, name, false)?;
    // Closing the last fd of a non-persistent device destroys it.
    drop(queue);
    tracing::info!(tap = name, "tap deleted");
    Ok(())
}

/// True if `name` is a valid interface name and a TAP device of that name exists.
pub fn tap_exists(name: &str) -> bool {
    names::is_valid_ifname(name) && tun_flags(name).is_some_and(|f| f & TAP_TYPE_FLAG != 0)
}

/// Names of the TAP devices whose name starts with `prefix`, sorted.
pub fn list_taps(prefix: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir(SYS_CLASS_NET) else {
        return Vec::new();
    };
    let mut taps: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix) && tap_exists(n))
        .collect();
    taps.sort();
    taps
}

/// Creates the Linux bridge `name` if it is missing, and brings it up.
///
/// Fails with [`TapError::NotBridge`] if another kind of interface has the name.
pub fn ensure_bridge(name: &str) -> Result<(), TapError> {
    check_name(name)?;
    if interface_exists(name) {
        if !bridge_exists(name) {
            return Err(TapError::NotBridge(name.to_string()));
        }
    } else {
        match bridge_ioctl(SIOCBRADDBR, "SIOCBRADDBR", name) {
            Err(TapError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {}
            other => other?,
        }
        tracing::info!(bridge = name, "bridge created");
    }
    set_up(name, true)
}

/// Deletes the Linux bridge `name` (brought down first); idempotent when absent.
pub fn delete_bridge(name: &str) -> Result<(), TapError> {
    check_name(name)?;
    if !interface_exists(name) {
        return Ok(());
    }
    if !bridge_exists(name) {
        return Err(TapError::NotBridge(name.to_string()));
    }
    set_up(name, false)?;
    bridge_ioctl(SIOCBRDELBR, "SIOCBRDELBR", name)?;
    tracing::info!(bridge = name, "bridge deleted");
    Ok(())
}

/// True if `name` is a valid interface name and a bridge of that name exists.
pub fn bridge_exists(name: &str) -> bool {
    names::is_valid_ifname(name) && sys_net(name).join("bridge").is_dir()
}

/// The bridge interface `name` is a port of, if any.
pub fn bridge_of(name: &str) -> Option<String> {
    if !names::is_valid_ifname(name) {
        return None;
    }
    let master = fs::read_link(sys_net(name).join("master")).ok()?;
    master.file_name()?.to_str().map(str::to_string)
}

/// Makes interface `tap` a port of `bridge` (`SIOCBRADDIF`).
///
/// Idempotent when it already is; fails with
/// [`TapError::AttachedElsewhere`] if it is a port of another bridge.
pub fn attach_to_bridge(tap: &str, bridge: &str) -> Result<(), TapError> {
    check_bridge_and_port(tap, bridge)?;
    match bridge_of(tap) {
        Some(current) if current == bridge => return Ok(()),
        Some(current) => {
            return Err(TapError::AttachedElsewhere {
                name: tap.to_string(),
                bridge: current,
            })
        }
        None => {}
    }
    port_ioctl(SIOCBRADDIF, "SIOCBRADDIF", tap, bridge)?;
    tracing::info!(tap, bridge, "tap attached to bridge");
    Ok(())
}

/// Removes interface `tap` from `bridge` (`SIOCBRDELIF`); idempotent when
/// it is not a port of that bridge.
pub fn detach_from_bridge(tap: &str, bridge: &str) -> Result<(), TapError> {
    check_bridge_and_port(tap, bridge)?;
    if bridge_of(tap).as_deref() != Some(bridge) {
        return Ok(());
    }
    port_ioctl(SIOCBRDELIF, "SIOCBRDELIF", tap, bridge)?;
    tracing::info!(tap, bridge, "tap detached from bridge");
    Ok(())
}

/// `IFF_TAP` as found in sysfs `tun_flags`.
const TAP_TYPE_FLAG: u32 = libc::IFF_TAP as u32;

fn check_name(name: &str) -> Result<(), TapError> {
    if names::is_valid_ifname(name) {
        Ok(())
    } else {
        Err(TapError::InvalidName(name.to_string()))
    }
}

fn check_bridge_and_port(tap: &str, bridge: &str) -> Result<(), TapError> {
    check_name(tap)?;
    check_name(bridge)?;
    if !interface_exists(tap) {
        return Err(TapError::NotFound(tap.to_string()));
    }
    match (interface_exists(bridge), bridge_exists(bridge)) {
        (_, true) => Ok(()),
        (true, false) => Err(TapError::NotBridge(bridge.to_string())),
        (false, false) => Err(TapError::NotFound(bridge.to_string())),
    }
}

fn sys_net(name: &str) -> PathBuf {
    Path::new(SYS_CLASS_NET).join(name)
}

fn interface_exists(name: &str) -> bool {
    sys_net(name).exists()
}

/// The `tun_flags` of a TUN/TAP device; `None` for other interfaces.
fn tun_flags(name: &str) -> Option<u32> {
    let text = fs::read_to_string(sys_net(name).join("tun_flags")).ok()?;
    parse_hex(&text)
}

fn parse_hex(text: &str) -> Option<u32> {
    let text = text.trim();
    u32::from_str_radix(text.strip_prefix("0x").unwrap_or(text), 16).ok()
}

/// Opens a queue of TAP device `name`, creating the device if missing.
fn open_tap_queue(name: &str) -> Result<File, TapError> {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_DEVICE)
        .map_err(TapError::OpenTun)?;
    let mut req = ifreq_for(name);
    // TAP_FLAGS is 0x5002, which fits in a c_short.
    req.ifr_ifru.ifru_flags = TAP_FLAGS as libc::c_short;
    ifreq_ioctl(&tun, libc::TUNSETIFF, &mut req, "TUNSETIFF", name)?;
    Ok(tun)
}

fn set_persist(queue: &File, name: &str, persist: bool) -> Result<(), TapError> {
    let value = libc::c_ulong::from(persist);
    // SAFETY: TUNSETPERSIST takes its argument by value and touches no memory.
    let rc = unsafe { libc::ioctl(queue.as_raw_fd(), libc::TUNSETPERSIST, value) };
    check_rc(rc, "TUNSETPERSIST", name)
}

/// Sets or clears `IFF_UP` on interface `name`.
fn set_up(name: &str, up: bool) -> Result<(), TapError> {
    let sock = control_socket(name)?;
    let mut req = ifreq_for(name);
    ifreq_ioctl(&sock, SIOCGIFFLAGS, &mut req, "SIOCGIFFLAGS", name)?;
    // SAFETY: SIOCGIFFLAGS succeeded, so the kernel stored the flags member.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    // IFF_UP is 1, which fits in a c_short.
    let up_flag = libc::IFF_UP as libc::c_short;
    req.ifr_ifru.ifru_flags = if up {
        flags | up_flag
    } else {
        flags & !up_flag
    };
    ifreq_ioctl(&sock, SIOCSIFFLAGS, &mut req, "SIOCSIFFLAGS", name)
}

/// Adds or removes port `tap` on `bridge`.
fn port_ioctl(
    request: libc::Ioctl,
    op: &'static str,
    tap: &str,
    bridge: &str,
) -> Result<(), TapError> {
    let sock = control_socket(tap)?;
    let mut req = ifreq_for(tap);
    ifreq_ioctl(&sock, SIOCGIFINDEX, &mut req, "SIOCGIFINDEX", tap)?;
    // SAFETY: SIOCGIFINDEX succeeded, so the kernel stored the ifindex member.
    let index = unsafe { req.ifr_ifru.ifru_ifindex };
    let mut req = ifreq_for(bridge);
    req.ifr_ifru.ifru_ifindex = index;
    ifreq_ioctl(&sock, request, &mut req, op, bridge)
}

/// Creates or deletes bridge `name` (`SIOCBRADDBR` / `SIOCBRDELBR`).
fn bridge_ioctl(request: libc::Ioctl, op: &'static str, name: &str) -> Result<(), TapError> {
    let sock = control_socket(name)?;
    // The kernel copies a full IFNAMSIZ buffer, so pass one rather than a CString.
    let mut buf = ifreq_for(name).ifr_name;
    // SAFETY: both requests read IFNAMSIZ bytes from the pointer, and `buf`
    // is an IFNAMSIZ array that is NUL-terminated (names are at most 15 bytes).
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request, buf.as_mut_ptr()) };
    check_rc(rc, op, name)
}

/// Runs an ioctl whose argument is a `struct ifreq`.
///
/// Only for TUNSETIFF, SIOC[GS]IFFLAGS, SIOCGIFINDEX and SIOCBR{ADD,DEL}IF.
fn ifreq_ioctl(
    fd: &impl AsRawFd,
    request: libc::Ioctl,
    req: &mut libc::ifreq,
    op: &'static str,
    name: &str,
) -> Result<(), TapError> {
    // SAFETY: the requests allowed here read and/or write exactly one
    // `struct ifreq`, and `req` is a valid, exclusively borrowed ifreq.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, std::ptr::from_mut(req)) };
    check_rc(rc, op, name)
}

fn check_rc(rc: libc::c_int, op: &'static str, name: &str) -> Result<(), TapError> {
    if rc < 0 {
        let source = io::Error::last_os_error();
        return Err(TapError::Ioctl {
            op,
            name: name.to_string(),
            source,
        });
    }
    Ok(())
}

/// A zeroed `ifreq` carrying `name` (validated: at most 15 bytes, so it
/// stays NUL-terminated).
fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is a C struct of integers, arrays, pointers and unions of
    // those, for all of which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let room = req.ifr_name.len() - 1;
    for (dst, src) in req.ifr_name.iter_mut().take(room).zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

/// An `AF_INET` datagram socket to issue interface ioctls on.
fn control_socket(name: &str) -> Result<OwnedFd, TapError> {
    // SAFETY: socket takes no pointers; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(TapError::Socket(
            name.to_string(),
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests;

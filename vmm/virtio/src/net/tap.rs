//! A TAP interface opened through `/dev/net/tun`.
//!
//! The TAP is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte
//! vnet header (`virtio_net_hdr_v1`, the VERSION_1 layout) and `O_NONBLOCK`.
//! If the named interface does not exist it is created (needs
//! `CAP_NET_ADMIN`) and disappears when the last fd closes.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::handler::{NetBackend, VNET_HDR_LEN};

/// Longest interface name (`IFNAMSIZ` - 1).
pub const MAX_NAME_LEN: usize = 15;
const TUN_PATH: &str = "/dev/net/tun";

/// Errors opening or configuring a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty, too long or contains `/` or NUL.
    #[error("invalid TAP interface name {0:?}")]
    InvalidName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open {TUN_PATH} for TAP interface {name}")]
    OpenTun {
        /// The interface.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `TUNSETIFF` failed (EPERM: no CAP_NET_ADMIN, EBUSY: in use, ...).
    #[error("cannot attach to TAP interface {name}")]
    Attach {
        /// The interface.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `TUNSETVNETHDRSZ` failed.
    #[error("cannot set vnet header size on TAP interface {name}")]
    VnetHdrSize {
        /// The interface.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `TUNSETOFFLOAD` failed.
    #[error("cannot set offloads {flags:#x} on TAP interface {name}")]
    Offload {
        /// The interface.
        name: String,
        /// The `TUN_F_*` flags.
        flags: u32,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` with the `ifr_flags` member of its union.
#[repr(C)]
struct IfReqFlags {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (or creates) the TAP interface `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let ifreq = ifreq_for(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|source| TapError::OpenTun {
                name: name.to_string(),
                source,
            })?;
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        tap.attach(ifreq)?;
        tap.set_vnet_hdr_size()?;
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the offloads (`TUN_F_*`) the TAP may use for frames it hands us.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is a
        // tun fd owned by `self`.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        check(ret).map_err(|source| TapError::Offload {
            name: self.name.clone(),
            flags,
            source,
        })
    }

    fn attach(&self, mut ifreq: IfReqFlags) -> Result<(), TapError> {
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `ifreq` is a
        // correctly sized and aligned ifreq that lives across the call.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETIFF, &mut ifreq) };
        check(ret).map_err(|source| TapError::Attach {
            name: self.name.clone(),
            source,
        })
    }

    fn set_vnet_hdr_size(&self) -> Result<(), TapError> {
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points to a live local.
        let ret = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
        check(ret).map_err(|source| TapError::VnetHdrSize {
            name: self.name.clone(),
            source,
        })
    }
}

fn ifreq_for(name: &str) -> Result<IfReqFlags, TapError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_NAME_LEN || bytes.iter().any(|&b| b == 0 || b == b'/')
    {
        return Err(TapError::InvalidName(name.to_string()));
    }
    let mut ifreq = IfReqFlags {
        name: [0; 16],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    ifreq.name[..bytes.len()].copy_from_slice(bytes);
    Ok(ifreq)
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
}

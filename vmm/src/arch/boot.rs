//! Loading the kernel, initrd and command line, and filling the zero page
//! (`struct boot_params`) as the Linux x86 boot protocol asks.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::*;
use crate::GuestMemoryMmap;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const PAGE_SIZE: u64 = 4096;

/// Errors while loading the guest's boot images.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened or read.
    #[error("cannot read kernel {path}")]
    KernelFile {
        /// The kernel path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither a loadable ELF nor a bzImage.
    #[error("kernel {path} is not a loadable ELF vmlinux or bzImage")]
    KernelFormat {
        /// The kernel path.
        path: String,
        /// The loader's complaint.
        #[source]
        source: loader::Error,
    },
    /// The initrd file could not be read.
    #[error("cannot read initrd {path}")]
    InitrdFile {
        /// The initrd path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit in guest memory below the kernel's limit.
    #[error("initrd of {size} bytes does not fit in guest memory")]
    InitrdTooBig {
        /// Its size.
        size: u64,
    },
    /// The kernel command line could not be written.
    #[error("invalid kernel command line")]
    Cmdline(#[source] loader::Error),
    /// The kernel command line is invalid or too long.
    #[error("invalid kernel command line")]
    CmdlineBuild(#[source] linux_loader::cmdline::Error),
    /// Writing boot structures to guest memory failed.
    #[error("cannot write {what} to guest memory")]
    GuestMemory {
        /// Which structure.
        what: &'static str,
        /// The cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

type Result<T> = std::result::Result<T, BootError>;

/// Where the kernel landed and how to enter it.
#[derive(Clone, Copy, Debug)]
pub struct KernelEntry {
    /// 64-bit entry point.
    pub entry: GuestAddress,
    /// End of the loaded image.
    pub end: u64,
    /// The bzImage setup header, which the zero page must carry.
    pub setup_header: Option<setup_header>,
}

/// The RAM ranges of a guest of `mem_bytes`, skipping the 32-bit device hole.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    if mem_bytes <= MEM_32BIT_GAP_START {
        vec![(GuestAddress(0), mem_bytes as usize)]
    } else {
        vec![
            (GuestAddress(0), MEM_32BIT_GAP_START as usize),
            (
                GuestAddress(RAM_64BIT_START),
                (mem_bytes - MEM_32BIT_GAP_START) as usize,
            ),
        ]
    }
}

/// Load the kernel at `path` (ELF vmlinux or bzImage) into guest memory.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<KernelEntry> {
    let display = path.display().to_string();
    let io_err = |source| BootError::KernelFile {
        path: display.clone(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).map_err(io_err)?;
    file.seek(SeekFrom::Start(0)).map_err(io_err)?;
    let format_err = |source| BootError::KernelFormat {
        path: display.clone(),
        source,
    };
    if magic == *b"\x7fELF" {
        let res =
            Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(format_err)?;
        Ok(KernelEntry {
            entry: res.kernel_load,
            end: res.kernel_end,
            setup_header: None,
        })
    } else {
        let res = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(format_err)?;
        Ok(KernelEntry {
            // The 64-bit entry point of a bzImage sits 0x200 past its start.
            entry: res.kernel_load.unchecked_add(0x200),
            end: res.kernel_end,
            setup_header: res.setup_header,
        })
    }
}

/// Load the initrd as high as possible below 4 GiB and the kernel's limit.
/// Returns its address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &KernelEntry,
) -> Result<(GuestAddress, u64)> {
    let display = path.display().to_string();
    let io_err = |source| BootError::InitrdFile {
        path: display.clone(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let size = file.metadata().map_err(io_err)?.len();
    let low_end = mem
        .find_region(GuestAddress(0))
        .map(|r| r.len())
        .unwrap_or(0);
    let limit = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max) + 1)
        .filter(|l| *l > 1)
        .unwrap_or(u64::MAX)
        .min(low_end);
    let floor = kernel.end.max(HIMEM_START);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|a| *a >= floor)
        .ok_or(BootError::InitrdTooBig { size })?;
    let addr = GuestAddress(addr);
    mem.read_exact_volatile_from(addr, &mut file, size as usize)
        .map_err(|source| BootError::GuestMemory {
            what: "initrd",
            source,
        })?;
    Ok((addr, size))
}

/// Build the kernel command line from the user's string.
pub fn build_cmdline(user: &str) -> Result<Cmdline> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::CmdlineBuild)?;
    cmdline.insert_str(user).map_err(BootError::CmdlineBuild)?;
    Ok(cmdline)
}

/// The e820 map: low RAM, the reserved BIOS/ACPI area, RAM, the ECAM hole
/// (reserved so that Linux trusts MCFG) and RAM above 4 GiB.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<boot_e820_entry> {
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map.push(entry(PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED));
    map.sort_by_key(|e| e.addr);
    map
}

/// Everything the zero page describes.
pub struct ZeroPage<'a> {
    /// The loaded kernel.
    pub kernel: &'a KernelEntry,
    /// Length of the command line without its NUL.
    pub cmdline_len: usize,
    /// The loaded initrd, if any.
    pub initrd: Option<(GuestAddress, u64)>,
    /// Address of the RSDP.
    pub rsdp: GuestAddress,
}

/// Real-mode code at the reset vector: `mov al, 0xfe; out 0x64, al`
/// (pulse the reset line through the i8042), then `hlt` forever. There is no
/// BIOS, and hardware-reduced ACPI makes Linux reboot through EFI and then
/// by jumping here ("BIOS reboot") unless `reboot=` says otherwise: this turns
/// that jump into a reset the VMM sees.
const RESET_STUB: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

/// Write the reset-vector stub.
pub fn write_reset_stub(mem: &GuestMemoryMmap) -> Result<()> {
    mem.write_slice(&RESET_STUB, GuestAddress(RESET_VECTOR))
        .map_err(|source| BootError::GuestMemory {
            what: "the reset-vector stub",
            source,
        })
}

/// Write the command line and the zero page into guest memory.
pub fn write_zero_page(mem: &GuestMemoryMmap, cmdline: &Cmdline, zp: &ZeroPage) -> Result<()> {
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(BootError::Cmdline)?;
    let mut params = boot_params::default();
    if let Some(hdr) = zp.kernel.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = zp.cmdline_len as u32;
    if let Some((addr, size)) = zp.initrd {
        params.hdr.ramdisk_image = addr.raw_value() as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = zp.rsdp.raw_value();
    let map = e820_map(mem);
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|source| BootError::GuestMemory {
            what: "boot_params",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&ram_ranges(size)).unwrap()
    }

    #[test]
    fn ram_ranges_skip_the_hole() {
        assert_eq!(ram_ranges(1 << 30), vec![(GuestAddress(0), 1 << 30)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MEM_32BIT_GAP_START as usize));
        assert_eq!(r[1], (GuestAddress(RAM_64BIT_START), (1 << 30) as usize));
    }

    #[test]
    fn e820_reserves_bios_area_and_ecam() {
        let m = mem(64 << 20);
        let map = e820_map(&m);
        let kinds: Vec<(u64, u64, u32)> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            kinds,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM),
                (PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED),
            ]
        );
    }

    #[test]
    fn garbage_kernel_is_refused() {
        let m = mem(64 << 20);
        let path = std::env::temp_dir().join(format!("ferro-garbage-{}", std::process::id()));
        std::fs::write(&path, vec![0x42u8; 8192]).unwrap();
        let err = load_kernel(&m, &path).unwrap_err();
        assert!(matches!(err, BootError::KernelFormat { .. }), "{err}");
        std::fs::remove_file(&path).unwrap();
        let err = load_kernel(&m, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(matches!(err, BootError::KernelFile { .. }));
    }

    #[test]
    fn zero_page_carries_cmdline_and_rsdp() {
        let m = mem(64 << 20);
        let kernel = KernelEntry {
            entry: GuestAddress(0x20_0000),
            end: 0x30_0000,
            setup_header: None,
        };
        let cmdline = build_cmdline("console=ttyS0 ferro.exit=reboot").unwrap();
        let zp = ZeroPage {
            kernel: &kernel,
            cmdline_len: 31,
            initrd: None,
            rsdp: GuestAddress(ACPI_START),
        };
        write_zero_page(&m, &cmdline, &zp).unwrap();
        let params: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.acpi_rsdp_addr }, ACPI_START);
        assert_eq!(params.e820_entries, 4);
        let mut buf = [0u8; 32];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf[..31], b"console=ttyS0 ferro.exit=reboot");
        assert_eq!(buf[31], 0);
    }
}

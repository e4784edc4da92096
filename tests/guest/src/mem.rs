//! Memory: the C memory primitives the compiler calls, physical memory access
//! (identity-mapped), MMIO, and a bump allocator for DMA memory.

use core::arch::asm;
use core::sync::atomic::{AtomicUsize, Ordering};

/// `memcpy` for the compiler (compiler_builtins' `mem` feature is off on the
/// gnu target). `rep movsb` is fast on current CPUs and only runs at CPL3.
///
/// # Safety
/// The usual `memcpy` contract: valid, non-overlapping ranges.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller passes valid, non-overlapping ranges of `n` bytes.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// `memmove`: copies backwards when `dst` overlaps the tail of `src`.
///
/// # Safety
/// Valid ranges of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // SAFETY: no harmful overlap for a forward copy.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backward copy with the direction flag set, restored after.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dst.add(n).wrapping_sub(1) => _,
             inout("rsi") src.add(n).wrapping_sub(1) => _, options(nostack));
    }
    dst
}

/// `memset`.
///
/// # Safety
/// A valid range of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller passes a valid range of `n` bytes.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// `memcmp`.
///
/// # Safety
/// Valid ranges of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n, within both ranges.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// `bcmp`: zero when equal.
///
/// # Safety
/// Valid ranges of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

/// Reads a `T` at a physical address (identity-mapped; may be unaligned).
pub fn read_phys<T: Copy>(addr: u64) -> T {
    // SAFETY: every physical address below 4 GiB is mapped; callers read
    // firmware/loader structures that the VMM placed in RAM.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// Copies physical memory into `buf`.
pub fn read_phys_bytes(addr: u64, buf: &mut [u8]) {
    // SAFETY: as for `read_phys`.
    unsafe { core::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
}

/// Volatile MMIO read of a `T` (u8/u16/u32; one access).
pub fn mmio_read<T: Copy>(addr: u64) -> T {
    // SAFETY: `addr` is a device register inside a mapped, uncached BAR or
    // ECAM window found through PCI/ACPI, naturally aligned for `T`.
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

/// Volatile MMIO write of a `T` (u8/u16/u32; one access).
pub fn mmio_write<T: Copy>(addr: u64, value: T) {
    // SAFETY: as for `mmio_read`.
    unsafe { core::ptr::write_volatile(addr as *mut T, value) }
}

/// Size of the DMA pool.
const DMA_POOL_SIZE: usize = 1 << 20;

#[repr(C, align(4096))]
struct DmaPool([u8; DMA_POOL_SIZE]);

/// Memory handed to devices: in `.bss`, so zeroed, and identity-mapped, so
/// its virtual address is the physical address devices use.
static mut DMA_POOL: DmaPool = DmaPool([0; DMA_POOL_SIZE]);
static DMA_NEXT: AtomicUsize = AtomicUsize::new(0);

/// Allocates `size` zeroed bytes of DMA memory aligned to `align` (a power of
/// two); returns the physical (= virtual) address. Never freed.
pub fn dma_alloc(size: usize, align: usize) -> u64 {
    let base = core::ptr::addr_of_mut!(DMA_POOL) as usize;
    let mut cur = DMA_NEXT.load(Ordering::Relaxed);
    loop {
        let start = (base + cur + align - 1) & !(align - 1);
        let end = start - base + size;
        if end > DMA_POOL_SIZE {
            panic!("DMA pool exhausted ({size} bytes)");
        }
        match DMA_NEXT.compare_exchange(cur, end, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return start as u64,
            Err(now) => cur = now,
        }
    }
}

//! CPU exceptions, reported from CPL3: the CPL0 exception stub records the
//! vector, error code, faulting `rip` and `cr2` and returns here (on the
//! fault stack, interrupts off).

use crate::cpu::reset;

/// Called by `ferro_exception_common` (see `boot.rs`); never returns.
#[no_mangle]
extern "C" fn ferro_fault_entry(vector: u64, error: u64, rip: u64, cr2: u64) -> ! {
    crate::say!("panic: exception vector={vector} error={error:#x} rip={rip:#x} cr2={cr2:#x}");
    reset()
}

//! x86-64 specifics: the address map, CPUID, registers and the zero page.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod regs;

//! The CPUID a vCPU sees: KVM's supported set (what this host can
//! virtualise), with per-vCPU topology and features we do not emulate masked.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_THERMAL: u32 = 0x6;
const LEAF_EXT_FEATURES: u32 = 0x7;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_MONITOR: u32 = 1 << 3;
const ECX_VMX: u32 = 1 << 5;
const ECX_SMX: u32 = 1 << 6;
const ECX_EST: u32 = 1 << 7;
const ECX_TM2: u32 = 1 << 8;
const ECX_PDCM: u32 = 1 << 15;
const ECX_DTES64: u32 = 1 << 2;
const ECX_DS_CPL: u32 = 1 << 4;
const EDX_HTT: u32 = 1 << 28;
const EDX_ACPI: u32 = 1 << 22;
const EDX_DS: u32 = 1 << 21;
const EDX_TM: u32 = 1 << 29;
const EDX_PBE: u32 = 1 << 31;
/// Leaf 7 EDX: hybrid CPU (P/E cores) would confuse a guest scheduler.
const LEAF7_EDX_HYBRID: u32 = 1 << 15;

/// Adjust `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `index` of `count`.
pub fn filter(cpuid: &mut CpuId, index: u8, count: u8) {
    for entry in cpuid.as_mut_slice() {
        filter_entry(entry, index, count);
    }
}

fn filter_entry(entry: &mut kvm_cpuid_entry2, index: u8, count: u8) {
    match entry.function {
        LEAF_FEATURES => {
            // APIC id, logical processor count and CLFLUSH line size (8 * 8 bytes).
            entry.ebx = (u32::from(index) << 24) | (u32::from(count) << 16) | (8 << 8);
            entry.ecx |= ECX_HYPERVISOR;
            entry.ecx &= !(ECX_MONITOR
                | ECX_VMX
                | ECX_SMX
                | ECX_EST
                | ECX_TM2
                | ECX_PDCM
                | ECX_DTES64
                | ECX_DS_CPL);
            entry.edx &= !(EDX_ACPI | EDX_DS | EDX_TM | EDX_PBE);
            if count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // One core per vCPU, one thread per core.
            entry.eax &= 0x3ff;
            entry.eax |= u32::from(count.saturating_sub(1)) << 26;
        }
        LEAF_THERMAL | LEAF_PMU => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        LEAF_EXT_FEATURES if entry.index == 0 => {
            entry.edx &= !LEAF7_EDX_HYBRID;
        }
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
            entry.edx = u32::from(index);
            match entry.index {
                // SMT level: one thread per core.
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = 1 << 8;
                }
                // Core level: `count` cores in the package.
                1 => {
                    entry.eax = 32 - u32::from(count).saturating_sub(1).leading_zeros();
                    entry.ebx = u32::from(count);
                    entry.ecx = (2 << 8) | 1;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_topology_and_masks() {
        let mut e = entry(LEAF_FEATURES, 0);
        filter_entry(&mut e, 3, 4);
        assert_eq!(e.ebx >> 24, 3, "APIC id");
        assert_eq!((e.ebx >> 16) & 0xff, 4, "logical count");
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(e.ecx & (ECX_VMX | ECX_MONITOR), 0);
        assert_ne!(e.edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaf_reports_apic_id() {
        let mut e = entry(LEAF_TOPOLOGY, 1);
        filter_entry(&mut e, 2, 3);
        assert_eq!(e.edx, 2);
        assert_eq!(e.ebx, 3);
        assert_eq!(e.eax, 2, "two bits of core id for three cores");
        let mut pmu = entry(LEAF_PMU, 0);
        filter_entry(&mut pmu, 0, 1);
        assert_eq!((pmu.eax, pmu.edx), (0, 0));
    }
}

//! Facts about the host for `HostInfo`.

use std::path::Path;

/// The first `model name` of /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Logical CPUs of the host.
pub fn cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

fn meminfo_mib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(key)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib / 1024)
}

/// Host RAM (MemTotal) in MiB.
pub fn mem_total_mib() -> u64 {
    meminfo_mib("MemTotal")
}

/// Available RAM (MemAvailable) in MiB.
pub fn mem_available_mib() -> u64 {
    meminfo_mib("MemAvailable")
}

/// Whether /dev/kvm exists.
pub fn kvm_present() -> bool {
    Path::new("/dev/kvm").exists()
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_facts_are_read() {
        assert!(super::mem_total_mib() > 0);
        assert!(super::mem_available_mib() <= super::mem_total_mib());
        assert!(super::cpus() >= 1);
    }
}

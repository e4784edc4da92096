//! Debian's stock cloud kernel as `deploy/fetch-guest-kernel.sh` unpacks it:
//! the bzImage, the extracted ELF vmlinux and the modules, with their
//! dependencies resolved from `modules.dep`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::Error;

/// The unpacked kernel package under `target/guest-kernel`.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    /// `boot/vmlinuz-*`: the compressed bzImage (L1 boots it under QEMU).
    pub bzimage: PathBuf,
    /// The extracted ELF vmlinux.
    pub vmlinux: PathBuf,
    /// `lib/modules/<version>`.
    pub modules: PathBuf,
    /// Module name (`virtio_blk`, `kvm-amd`, ...) -> path relative to
    /// `modules` and the relative paths it depends on.
    deps: HashMap<String, (String, Vec<String>)>,
}

fn module_name(rel: &str) -> String {
    let file = rel.rsplit('/').next().unwrap_or(rel);
    file.trim_end_matches(".ko").to_string()
}

impl GuestKernel {
    /// Find the kernel unpacked under `dir` (normally
    /// `<workspace>/target/guest-kernel`).
    pub fn locate(dir: &Path) -> Result<Self, Error> {
        let missing = |what: &str| {
            Error::Precondition(format!(
                "{what} not found under {} (run deploy/fetch-guest-kernel.sh)",
                dir.display()
            ))
        };
        let bzimage = dir.join("vmlinuz");
        let vmlinux = dir.join("vmlinux");
        if !bzimage.exists() {
            return Err(missing("vmlinuz"));
        }
        if !vmlinux.exists() {
            return Err(missing("vmlinux"));
        }
        let modules = std::fs::read_dir(dir.join("lib/modules"))
            .map_err(|_| missing("lib/modules"))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("modules.dep").exists())
            .ok_or_else(|| missing("lib/modules/*/modules.dep"))?;
        let dep_file = modules.join("modules.dep");
        let text = std::fs::read_to_string(&dep_file).map_err(|e| Error::io(&dep_file, e))?;
        Ok(Self {
            bzimage,
            vmlinux,
            deps: parse_modules_dep(&text),
            modules,
        })
    }

    /// The module files needed to load `names`, dependencies first, each
    /// once: (module name, absolute path).
    pub fn modules_for(&self, names: &[&str]) -> Result<Vec<(String, PathBuf)>, Error> {
        let mut order: Vec<String> = Vec::new();
        for n in names {
            self.visit(n, &mut order, 0)?;
        }
        Ok(order
            .into_iter()
            .map(|rel| (module_name(&rel), self.modules.join(&rel)))
            .collect())
    }

    fn visit(&self, name: &str, order: &mut Vec<String>, depth: usize) -> Result<(), Error> {
        let key = name.replace('-', "_");
        let (rel, deps) = self.deps.get(&key).ok_or_else(|| {
            Error::Precondition(format!("kernel module {name} is not in modules.dep"))
        })?;
        if order.contains(rel) {
            return Ok(());
        }
        if depth > 32 {
            return Err(Error::Precondition(format!(
                "module dependency loop at {name}"
            )));
        }
        for d in deps {
            self.visit(&module_name(d), order, depth + 1)?;
        }
        order.push(rel.clone());
        Ok(())
    }
}

/// `kernel/a/b.ko: kernel/c.ko kernel/d.ko` lines, keyed by module name
/// with `-` folded to `_` (as modprobe does).
fn parse_modules_dep(text: &str) -> HashMap<String, (String, Vec<String>)> {
    let mut map = HashMap::new();
    for line in text.lines() {
        let Some((m, deps)) = line.split_once(':') else {
            continue;
        };
        let m = m.trim().to_string();
        let deps = deps.split_whitespace().map(str::to_string).collect();
        map.insert(module_name(&m).replace('-', "_"), (m, deps));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_come_first_and_once() {
        let dep = "kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko\n\
                   kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko\n\
                   kernel/virt/lib/irqbypass.ko:\n\
                   kernel/drivers/net/tun.ko:\n";
        let k = GuestKernel {
            bzimage: PathBuf::new(),
            vmlinux: PathBuf::new(),
            modules: PathBuf::from("/m"),
            deps: parse_modules_dep(dep),
        };
        let names: Vec<String> = k
            .modules_for(&["kvm_amd", "tun", "kvm"])
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["irqbypass", "kvm", "kvm-amd", "tun"]);
        assert!(k.modules_for(&["nope"]).is_err());
    }
}

//! What `ferro up` needs from this machine: root and KVM, the daemons'
//! binaries next to `ferro`, and the test guest's kernel.

use std::path::{Path, PathBuf};

use super::{note, UpError};

/// root and a usable /dev/kvm.
pub fn preflight() -> Result<(), UpError> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (it creates TAPs and cgroups)".to_string());
    }
    if let Err(e) = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        missing.push(format!("a readable and writable /dev/kvm ({e})"));
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(UpError::Preflight(missing.join(" and ")))
    }
}

/// The daemons' binaries, next to `ferro`.
#[derive(Debug)]
pub struct Binaries {
    /// `ferro-controller`.
    pub controller: PathBuf,
    /// `ferro-agent`.
    pub agent: PathBuf,
    /// `ferro-vmm`.
    pub vmm: PathBuf,
    /// `ferro-netd`.
    pub netd: PathBuf,
    /// `ferro-blockd`.
    pub blockd: PathBuf,
}

impl Binaries {
    /// Finds them in the directory of the running `ferro`.
    pub fn find() -> Result<Self, UpError> {
        let exe = std::env::current_exe()
            .map_err(|e| UpError::Guest(format!("cannot find the ferro executable: {e}")))?;
        let dir = exe.parent().unwrap_or(Path::new("/"));
        let get = |name: &str, package: &'static str| {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(UpError::MissingBinary(p, package))
            }
        };
        Ok(Self {
            controller: get("ferro-controller", "ferro-controller")?,
            agent: get("ferro-agent", "ferro-agent")?,
            vmm: get("ferro-vmm", "ferro-vmm")?,
            netd: get("ferro-netd", "ferro-netd")?,
            blockd: get("ferro-blockd", "ferro-blockd")?,
        })
    }
}

/// `--image-kernel`, else the test guest built from the repository that
/// holds the `ferro` executable (or the current directory).
pub fn guest_kernel(given: Option<&Path>) -> Result<PathBuf, UpError> {
    if let Some(p) = given {
        let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        if !abs.is_file() {
            return Err(UpError::Guest(format!(
                "--image-kernel {}: no such file",
                abs.display()
            )));
        }
        return Ok(abs);
    }
    let root = repo_root().ok_or_else(|| {
        UpError::Guest(
            "not run from the repository (no tests/guest/build.sh found); pass --image-kernel"
                .into(),
        )
    })?;
    note("building the test guest (tests/guest/build.sh)");
    let out = std::process::Command::new("bash")
        .arg(root.join("tests/guest/build.sh"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| UpError::Guest(format!("cannot run tests/guest/build.sh: {e}")))?;
    if !out.status.success() {
        return Err(UpError::Guest(format!(
            "tests/guest/build.sh failed ({})",
            out.status
        )));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let path = PathBuf::from(text.lines().last().unwrap_or("").trim());
    if path.is_file() {
        Ok(path)
    } else {
        Err(UpError::Guest(format!(
            "tests/guest/build.sh printed {}, not a file",
            path.display()
        )))
    }
}

fn repo_root() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok();
    let cwd = std::env::current_dir().ok();
    let starts = exe.iter().chain(cwd.iter());
    starts
        .flat_map(|s| s.ancestors().map(Path::to_path_buf).collect::<Vec<_>>())
        .find(|d| d.join("tests/guest/build.sh").is_file())
}

//! The state directory: where each instance's files live, and atomic JSON
//! writes (write a temporary file, fsync, rename, fsync the directory), so
//! a crash leaves either the old or the new version, never a torn one.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The version of the state files this agent writes (`version` in
/// `spec.json` and `state.json`). Version 0 is a file from before versions
/// were recorded. A file from a newer agent is read as far as this one
/// understands it, and its unknown fields are kept.
pub const FORMAT_VERSION: u32 = 1;

/// Errors reading or writing state files.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// File system error.
    #[error("cannot write or read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Bad JSON.
    #[error("invalid JSON in {path}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// The files of one instance under the state directory.
#[derive(Clone, Debug)]
pub struct InstancePaths {
    /// `instances/<id>/`.
    pub dir: PathBuf,
    /// Control socket, `run/<id>.sock` (kept short for `sun_path`).
    pub socket: PathBuf,
}

impl InstancePaths {
    /// The paths of instance `id` under `state_dir`.
    pub fn new(state_dir: &Path, id: &str) -> Self {
        Self {
            dir: state_dir.join("instances").join(id),
            socket: state_dir.join("run").join(format!("{id}.sock")),
        }
    }
    /// The spec, written once at create.
    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }
    /// The observed state, rewritten at every change.
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    /// The serial console log.
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// The VMM's stderr.
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    /// A disk image with serial `serial`.
    pub fn disk(&self, serial: &str) -> PathBuf {
        self.dir.join(format!("disk-{serial}.img"))
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PersistError + '_ {
    move |source| PersistError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write `value` as JSON to `path`, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), PersistError> {
    let json = serde_json::to_vec_pretty(value).map_err(|source| PersistError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&json).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Read JSON from `path`.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T, PersistError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&bytes).map_err(|source| PersistError::Json {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("ferro-persist-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.json");
        write_json(&p, &vec![1, 2, 3]).unwrap();
        write_json(&p, &vec![4]).unwrap();
        assert_eq!(read_json::<Vec<i32>>(&p).unwrap(), vec![4]);
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(names.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

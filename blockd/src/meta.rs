//! A replica's per-volume metadata file: the volume's epoch, kept beside
//! its data file so a restarted blockd still refuses a fenced primary.
//!
//! The file is a few lines of text, the last one a CRC32C of the others:
//!
//! ```text
//! ferro-blockd epoch v1
//! volume=vol-1
//! epoch=7
//! crc32c=1c2d3e4f
//! ```
//!
//! It is replaced atomically (temporary file, fsync, rename, fsync of the
//! directory). A file that does not parse is never deleted: it is renamed to
//! `<name>.corrupt-<unix seconds>` for an operator to look at and the open
//! fails, naming both paths.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::wire::crc32c;

const FIRST_LINE: &str = "ferro-blockd epoch v1";

/// Errors reading or writing the metadata file.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The file could not be read or written.
    #[error("cannot access epoch file {0}")]
    Io(PathBuf, #[source] io::Error),
    /// The file did not parse; it was moved aside.
    #[error("epoch file {path} is corrupt ({why}); moved to {quarantined}")]
    Corrupt {
        /// Where it was.
        path: PathBuf,
        /// What was wrong.
        why: String,
        /// Where it is now.
        quarantined: PathBuf,
    },
    /// The file did not parse and could not be moved aside either.
    #[error("epoch file {path} is corrupt ({why}) and cannot be moved aside")]
    Quarantine {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        why: String,
        /// The rename's failure.
        #[source]
        source: io::Error,
    },
}

/// The epoch file of one volume.
#[derive(Clone, Debug)]
pub struct EpochFile {
    path: PathBuf,
    volume: String,
}

impl EpochFile {
    /// The file at `path` for `volume`.
    pub fn new(path: PathBuf, volume: &str) -> Self {
        EpochFile {
            path,
            volume: volume.to_string(),
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored epoch, `None` if there is no file yet. A file that does
    /// not parse (or names another volume) is quarantined.
    pub fn load(&self) -> Result<Option<u64>, MetaError> {
        let text = match fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(MetaError::Io(self.path.clone(), e)),
        };
        match parse(&text, &self.volume) {
            Ok(epoch) => Ok(Some(epoch)),
            Err(why) => Err(self.quarantine(why)),
        }
    }

    /// Replaces the file with one holding `epoch`, durably.
    pub fn store(&self, epoch: u64) -> Result<(), MetaError> {
        let io = |e| MetaError::Io(self.path.clone(), e);
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(render(&self.volume, epoch).as_bytes())
            .map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        fs::rename(&tmp, &self.path).map_err(io)?;
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty());
        File::open(dir.unwrap_or(Path::new(".")))
            .and_then(|d| d.sync_all())
            .map_err(io)
    }

    fn quarantine(&self, why: String) -> MetaError {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut target = self.path.clone().into_os_string();
        target.push(format!(".corrupt-{secs}"));
        let mut quarantined = PathBuf::from(&target);
        let mut n = 1;
        while quarantined.exists() {
            quarantined = PathBuf::from(format!("{}.{n}", target.to_string_lossy()));
            n += 1;
        }
        tracing::error!(path = %self.path.display(), %why, to = %quarantined.display(),
            "corrupt epoch file quarantined");
        match fs::rename(&self.path, &quarantined) {
            Ok(()) => MetaError::Corrupt {
                path: self.path.clone(),
                why,
                quarantined,
            },
            Err(source) => MetaError::Quarantine {
                path: self.path.clone(),
                why,
                source,
            },
        }
    }
}

fn render(volume: &str, epoch: u64) -> String {
    let body = format!("{FIRST_LINE}\nvolume={volume}\nepoch={epoch}\n");
    format!("{body}crc32c={:08x}\n", crc32c(body.as_bytes()))
}

/// Parses the file's text, which must be exactly what [`render`] makes.
fn parse(text: &[u8], volume: &str) -> Result<u64, String> {
    let text = std::str::from_utf8(text).map_err(|_| "not UTF-8".to_string())?;
    let crc_at = text
        .rfind("crc32c=")
        .ok_or_else(|| "no crc32c line".to_string())?;
    let (body, crc_line) = text.split_at(crc_at);
    let crc = crc_line
        .strip_prefix("crc32c=")
        .and_then(|c| c.strip_suffix('\n'))
        .and_then(|c| u32::from_str_radix(c, 16).ok())
        .ok_or_else(|| "bad crc32c line".to_string())?;
    if crc != crc32c(body.as_bytes()) {
        return Err("checksum mismatch".into());
    }
    let mut lines = body.lines();
    if lines.next() != Some(FIRST_LINE) {
        return Err("unknown format".into());
    }
    let named = lines.next().and_then(|l| l.strip_prefix("volume="));
    if named != Some(volume) {
        return Err(format!("names volume {named:?}, not {volume}"));
    }
    let epoch = lines
        .next()
        .and_then(|l| l.strip_prefix("epoch="))
        .and_then(|e| e.parse::<u64>().ok())
        .ok_or_else(|| "bad epoch line".to_string())?;
    match lines.next() {
        None => Ok(epoch),
        Some(_) => Err("trailing lines".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("blockd-meta-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn stores_and_loads_atomically() {
        let dir = scratch("rw");
        let f = EpochFile::new(dir.join("v.epoch"), "v");
        assert_eq!(f.load().unwrap(), None);
        f.store(7).unwrap();
        assert_eq!(f.load().unwrap(), Some(7));
        f.store(u64::MAX).unwrap();
        assert_eq!(f.load().unwrap(), Some(u64::MAX));
        assert!(!dir.join("v.epoch.tmp").exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn parse_refuses_anything_but_the_exact_format() {
        let good = render("v", 3);
        assert_eq!(parse(good.as_bytes(), "v"), Ok(3));
        assert!(parse(good.as_bytes(), "w")
            .unwrap_err()
            .contains("names volume"));
        let flipped = good.replace("epoch=3", "epoch=4");
        assert_eq!(
            parse(flipped.as_bytes(), "v").unwrap_err(),
            "checksum mismatch"
        );
        assert!(parse(b"", "v").is_err());
        assert!(parse(&[0xff, 0xfe], "v").is_err());
        assert!(parse(&good.as_bytes()[..good.len() - 1], "v").is_err());
    }

    #[test]
    fn a_corrupt_file_is_quarantined_not_deleted() {
        let dir = scratch("corrupt");
        let path = dir.join("v.epoch");
        fs::write(&path, b"epoch=12 but scribbled on").unwrap();
        let err = EpochFile::new(path.clone(), "v").load().unwrap_err();
        let MetaError::Corrupt { quarantined, .. } = err else {
            panic!("not quarantined: {err}");
        };
        assert!(!path.exists());
        assert!(quarantined
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("v.epoch.corrupt-"));
        assert_eq!(
            fs::read(&quarantined).unwrap(),
            b"epoch=12 but scribbled on"
        );
        // A second corrupt file in the same second gets its own name.
        fs::write(&path, b"again").unwrap();
        let err = EpochFile::new(path.clone(), "v").load().unwrap_err();
        let MetaError::Corrupt {
            quarantined: q2, ..
        } = err
        else {
            panic!("not quarantined: {err}");
        };
        assert_ne!(q2, quarantined);
        assert_eq!(fs::read(&q2).unwrap(), b"again");
        let _ = fs::remove_dir_all(&dir);
    }
}

//! A writer for the `newc` cpio format that Linux unpacks as an initramfs.
//!
//! Archives are left uncompressed: the guests that unpack them run under
//! QEMU's emulator, where decompressing tens of MiB would cost seconds.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::Error;

/// Where an entry's contents come from.
#[derive(Debug, Clone)]
enum Source {
    Dir,
    File(PathBuf),
    Bytes(Vec<u8>),
    Symlink(String),
}

#[derive(Debug, Clone)]
struct Entry {
    /// Path inside the archive, without a leading `/`.
    name: String,
    mode: u32,
    source: Source,
}

/// An initramfs under construction: entries in the order they are added,
/// with every parent directory created before its children.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: Vec<Entry>,
    dirs: BTreeSet<String>,
}

fn clean(path: &str) -> String {
    path.trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    fn parents(&mut self, name: &str) {
        let mut acc = String::new();
        let parts: Vec<&str> = name.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            if self.dirs.insert(acc.clone()) {
                self.entries.push(Entry {
                    name: acc.clone(),
                    mode: 0o040755,
                    source: Source::Dir,
                });
            }
        }
    }

    /// An empty directory (and its parents).
    pub fn dir(&mut self, path: &str) -> &mut Self {
        let name = clean(path);
        self.parents(&name);
        if self.dirs.insert(name.clone()) {
            self.entries.push(Entry {
                name,
                mode: 0o040755,
                source: Source::Dir,
            });
        }
        self
    }

    /// A copy of host file `src` at `path`, read when the archive is written.
    pub fn file(&mut self, path: &str, src: impl Into<PathBuf>, mode: u32) -> &mut Self {
        let name = clean(path);
        self.parents(&name);
        self.entries.push(Entry {
            name,
            mode: 0o100000 | (mode & 0o7777),
            source: Source::File(src.into()),
        });
        self
    }

    /// A file with the given contents.
    pub fn bytes(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> &mut Self {
        let name = clean(path);
        self.parents(&name);
        self.entries.push(Entry {
            name,
            mode: 0o100000 | (mode & 0o7777),
            source: Source::Bytes(data.into()),
        });
        self
    }

    /// A symbolic link at `path` pointing at `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let name = clean(path);
        self.parents(&name);
        self.entries.push(Entry {
            name,
            mode: 0o120777,
            source: Source::Symlink(target.to_string()),
        });
        self
    }

    /// A fingerprint of the archive's inputs (names, modes, contents, and for
    /// host files their size and modification time), to skip rewriting an
    /// unchanged image.
    pub fn fingerprint(&self) -> String {
        // FNV-1a over a canonical description: collisions only cost a stale
        // cache, and the inputs are the project's own files.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |b: &[u8]| {
            for x in b {
                h = (h ^ u64::from(*x)).wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for e in &self.entries {
            eat(e.name.as_bytes());
            eat(&e.mode.to_le_bytes());
            match &e.source {
                Source::Dir => eat(b"d"),
                Source::Bytes(b) => eat(b),
                Source::Symlink(t) => eat(t.as_bytes()),
                Source::File(p) => {
                    eat(p.as_os_str().as_encoded_bytes());
                    if let Ok(m) = std::fs::metadata(p) {
                        eat(&m.len().to_le_bytes());
                        if let Ok(t) = m.modified() {
                            let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                            eat(&d.as_nanos().to_le_bytes());
                        }
                    }
                }
            }
        }
        format!("{h:016x}")
    }

    /// Write the archive to `out` unless `out` already holds this archive
    /// (same fingerprint, kept in `out.stamp`). Returns whether it wrote.
    pub fn write_cached(&self, out: &Path) -> Result<bool, Error> {
        let stamp = out.with_extension("stamp");
        let fp = self.fingerprint();
        if out.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == fp) {
            return Ok(false);
        }
        self.write(out)?;
        std::fs::write(&stamp, fp).map_err(|e| Error::io(&stamp, e))?;
        Ok(true)
    }

    /// Write the archive to `out`.
    pub fn write(&self, out: &Path) -> Result<(), Error> {
        if let Some(d) = out.parent() {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        let tmp = out.with_extension("tmp");
        let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        for (ino, e) in self.entries.iter().enumerate() {
            let data: Vec<u8> = match &e.source {
                Source::Dir => Vec::new(),
                Source::Bytes(b) => b.clone(),
                Source::Symlink(t) => t.as_bytes().to_vec(),
                Source::File(p) => std::fs::read(p).map_err(|err| Error::io(p, err))?,
            };
            let nlink = if matches!(e.source, Source::Dir) {
                2
            } else {
                1
            };
            header(&mut w, ino as u32 + 1, e.mode, nlink, data.len(), &e.name)
                .and_then(|_| w.write_all(&data))
                .and_then(|_| pad(&mut w, data.len()))
                .map_err(|err| Error::io(&tmp, err))?;
        }
        header(&mut w, 0, 0, 1, 0, "TRAILER!!!")
            .and_then(|_| w.flush())
            .map_err(|err| Error::io(&tmp, err))?;
        drop(w);
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))
    }
}

/// One `newc` header and the entry's name, padded to 4 bytes.
fn header(
    w: &mut impl Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    size: usize,
    name: &str,
) -> std::io::Result<()> {
    let namesize = name.len() + 1;
    write!(
        w,
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
         {dmaj:08x}{dmin:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
        uid = 0,
        gid = 0,
        mtime = 0,
        dmaj = 0,
        dmin = 0,
        rmaj = 0,
        rmin = 0,
        check = 0,
    )?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad(w, 110 + namesize)
}

fn pad(w: &mut impl Write, len: usize) -> std::io::Result<()> {
    let n = (4 - len % 4) % 4;
    w.write_all(&[0u8; 3][..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_aligned_and_parents_come_first() {
        let mut a = Archive::new();
        a.bytes("/bin/x/init", b"hello".to_vec(), 0o755)
            .symlink("/bin/sh", "busybox");
        let names: Vec<&str> = a.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["bin", "bin/x", "bin/x/init", "bin/sh"]);
        let dir = std::env::temp_dir().join(format!("cpio-test-{}", std::process::id()));
        let out = dir.join("a.cpio");
        assert!(a.write_cached(&out).unwrap());
        assert!(
            !a.write_cached(&out).unwrap(),
            "unchanged archive rewritten"
        );
        let data = std::fs::read(&out).unwrap();
        assert!(data.starts_with(b"070701"));
        assert_eq!(data.len() % 4, 0);
        // Every header starts on a 4-byte boundary with the magic.
        let mut off = 0;
        let mut seen = Vec::new();
        loop {
            assert_eq!(&data[off..off + 6], b"070701", "header at {off}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&data[off + 6 + i * 8..off + 14 + i * 8]).unwrap();
                usize::from_str_radix(s, 16).unwrap()
            };
            let (size, namesize) = (field(6), field(11));
            let name = std::str::from_utf8(&data[off + 110..off + 110 + namesize - 1]).unwrap();
            seen.push(name.to_string());
            if name == "TRAILER!!!" {
                break;
            }
            off += (110 + namesize).div_ceil(4) * 4;
            if name == "bin/x/init" {
                assert_eq!(&data[off..off + size], b"hello");
            }
            off += size.div_ceil(4) * 4;
        }
        assert_eq!(seen.last().unwrap(), "TRAILER!!!");
        assert_eq!(seen.len(), 5);
        let _ = std::fs::remove_dir_all(dir);
    }
}

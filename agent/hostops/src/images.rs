//! The local image store, and per-instance disks.
//!
//! Layout: `<dir>/<id>/{kernel, initrd, rootdisk, image.json}`. The
//! metadata file holds an [`Image`] with paths relative to the image
//! directory; the store hands out absolute paths. Registration builds the
//! image in `<dir>/.tmp-<pid>-<n>-<id>/` and renames it into place, so an
//! image is either complete or absent. Stored files are made read-only.
//!
//! Instances never write to the store: [`ImageStore::clone_disk`] gives
//! each one its own copy of the root disk (a reflink where the filesystem
//! supports it, else a sparse copy).

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, ErrorKind};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::names;

const METADATA_FILE: &str = "image.json";
const KERNEL_FILE: &str = "kernel";
const INITRD_FILE: &str = "initrd";
const ROOTDISK_FILE: &str = "rootdisk";
/// Prefix of work directories (registration in progress, removal).
const TEMP_PREFIX: &str = ".tmp-";

/// Unit of hole detection when copying: all-zero blocks are not written.
const BLOCK_SIZE: usize = 4096;
/// Read buffer size when copying and hashing.
const CHUNK_SIZE: usize = 1 << 20;
/// Zeros fed to the hasher for holes.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Errors of image store operations.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image id is not 1..=64 characters of `[A-Za-z0-9_-]`.
    #[error("invalid image id {0:?}: expected 1 to 64 characters of [A-Za-z0-9_-]")]
    InvalidId(String),
    /// An image with this id is already registered.
    #[error("image {0} already exists")]
    AlreadyExists(String),
    /// No image with this id is registered.
    #[error("image {0} not found")]
    NotFound(String),
    /// The image has no root disk to clone.
    #[error("image {0} has no root disk")]
    NoRootDisk(String),
    /// The destination of a new disk already exists; it is left untouched.
    #[error("disk {0} already exists")]
    DestinationExists(PathBuf),
    /// A filesystem operation failed.
    #[error("failed to {op} {path}")]
    Io {
        /// What was being done, e.g. `copy`.
        op: &'static str,
        /// File or directory concerned.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Cloning a disk failed; the partial destination was removed.
    #[error("failed to clone {src} to {dest}")]
    Clone {
        /// Source file.
        src: PathBuf,
        /// Destination file.
        dest: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// `image.json` could not be parsed or written.
    #[error("invalid image metadata {path}")]
    Metadata {
        /// The metadata file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A stored file no longer matches its recorded hash.
    #[error("image {id}: {path} has sha256 {actual}, expected {expected}")]
    HashMismatch {
        /// Image id.
        id: String,
        /// The stored file.
        path: PathBuf,
        /// Hash recorded at registration.
        expected: String,
        /// Hash computed now.
        actual: String,
    },
}

/// A registered image. Paths are absolute when returned by the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// Image id.
    pub id: String,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Initial ramdisk, if any.
    pub initrd: Option<PathBuf>,
    /// Root disk to clone for each instance, if any.
    pub rootdisk: Option<PathBuf>,
    /// Lower-case hex SHA-256 of the kernel.
    pub kernel_sha256: String,
    /// Lower-case hex SHA-256 of the initrd.
    pub initrd_sha256: Option<String>,
    /// Lower-case hex SHA-256 of the root disk.
    pub rootdisk_sha256: Option<String>,
    /// Registration time, seconds since the Unix epoch.
    pub created_unix: u64,
}

impl Image {
    /// The stored files with their recorded hashes.
    fn files(&self) -> Vec<(&Path, &str)> {
        let mut files = vec![(self.kernel.as_path(), self.kernel_sha256.as_str())];
        if let (Some(p), Some(h)) = (&self.initrd, &self.initrd_sha256) {
            files.push((p, h));
        }
        if let (Some(p), Some(h)) = (&self.rootdisk, &self.rootdisk_sha256) {
            files.push((p, h));
        }
        files
    }

    /// Joins the (relative, on-disk) paths onto the image directory.
    fn resolved(mut self, dir: &Path) -> Self {
        self.kernel = dir.join(&self.kernel);
        self.initrd = self.initrd.map(|p| dir.join(p));
        self.rootdisk = self.rootdisk.map(|p| dir.join(p));
        self
    }
}

/// How a disk was copied by [`clone_file`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneMethod {
    /// `FICLONE`: the copy shares extents copy-on-write with the source.
    Reflink,
    /// Data regions copied, holes and all-zero blocks left as holes.
    SparseCopy,
}

/// A directory of registered images.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
}

impl ImageStore {
    /// Opens (creating if needed) the store in `dir`, and removes work
    /// directories left behind by processes that no longer exist.
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let dir = fs::canonicalize(dir).map_err(io_err("resolve", dir))?;
        let store = ImageStore { dir };
        store.remove_stale_temp_dirs();
        Ok(store)
    }

    /// The store directory (absolute).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Copies the given files into the store as image `id`, hashing them.
    ///
    /// Fails with [`ImageError::AlreadyExists`] if `id` is taken. On any
    /// failure nothing is left in the store.
    pub fn register(
        &self,
        id: &str,
        kernel: &Path,
        initrd: Option<&Path>,
        rootdisk: Option<&Path>,
    ) -> Result<Image, ImageError> {
        check_id(id)?;
        let image_dir = self.dir.join(id);
        if image_dir.exists() {
            return Err(ImageError::AlreadyExists(id.to_string()));
        }
        let work = self.work_dir(id);
        fs::create_dir(&work).map_err(io_err("create", &work))?;
        let built = build_image(&work, id, kernel, initrd, rootdisk);
        let result = built.and_then(|image| self.publish(&work, &image_dir, id).map(|()| image));
        if result.is_err() {
            let _ = fs::remove_dir_all(&work);
        }
        let image = result?.resolved(&image_dir);
        tracing::info!(image = id, "image registered");
        Ok(image)
    }

    /// The image `id`.
    pub fn get(&self, id: &str) -> Result<Image, ImageError> {
        check_id(id)?;
        let image_dir = self.dir.join(id);
        let path = image_dir.join(METADATA_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(ImageError::NotFound(id.to_string()))
            }
            Err(source) => {
                return Err(ImageError::Io {
                    op: "read",
                    path,
                    source,
                })
            }
        };
        let image: Image =
            serde_json::from_str(&text).map_err(|source| ImageError::Metadata { path, source })?;
        Ok(image.resolved(&image_dir))
    }

    /// All readable images, sorted by id; unreadable ones are logged and skipped.
    pub fn list(&self) -> Vec<Image> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| names::is_valid_id(name))
            .collect();
        ids.sort();
        ids.iter().filter_map(|id| self.get_logged(id)).collect()
    }

    /// Removes image `id` (atomically: it is renamed away, then deleted).
    ///
    /// Disks cloned from it are independent files and stay valid.
    pub fn remove(&self, id: &str) -> Result<(), ImageError> {
        check_id(id)?;
        let image_dir = self.dir.join(id);
        let trash = self.work_dir(id);
        match fs::rename(&image_dir, &trash) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(ImageError::NotFound(id.to_string()))
            }
            Err(source) => {
                return Err(ImageError::Io {
                    op: "rename",
                    path: image_dir,
                    source,
                })
            }
        }
        fs::remove_dir_all(&trash).map_err(io_err("remove", &trash))?;
        tracing::info!(image = id, "image removed");
        Ok(())
    }

    /// Recomputes the hash of every file of image `id` and compares it with
    /// the recorded one.
    pub fn verify(&self, id: &str) -> Result<(), ImageError> {
        let image = self.get(id)?;
        for (path, expected) in image.files() {
            let actual = hash_file(path)?;
            if actual != expected {
                return Err(ImageError::HashMismatch {
                    id: id.to_string(),
                    path: path.to_path_buf(),
                    expected: expected.to_string(),
                    actual,
                });
            }
        }
        Ok(())
    }

    /// Creates `dest` as an instance's own writable copy of the root disk
    /// of image `image_id` (see [`clone_file`]).
    pub fn clone_disk(&self, image_id: &str, dest: &Path) -> Result<(), ImageError> {
        let image = self.get(image_id)?;
        let src = image
            .rootdisk
            .ok_or_else(|| ImageError::NoRootDisk(image_id.to_string()))?;
        let method = clone_file(&src, dest)?;
        tracing::info!(image = image_id, dest = %dest.display(), ?method, "root disk cloned");
        Ok(())
    }

    /// Creates a sparse, zero-filled disk; see [`create_blank_disk`].
    pub fn create_blank_disk(&self, dest: &Path, size_bytes: u64) -> Result<(), ImageError> {
        create_blank_disk(dest, size_bytes)
    }

    fn get_logged(&self, id: &str) -> Option<Image> {
        self.get(id)
            .map_err(|e| tracing::warn!(image = id, error = %e, "skipping unreadable image"))
            .ok()
    }

    /// Renames the finished work directory to `image_dir`.
    fn publish(&self, work: &Path, image_dir: &Path, id: &str) -> Result<(), ImageError> {
        match fs::rename(work, image_dir) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {
                return Err(ImageError::AlreadyExists(id.to_string()))
            }
            Err(source) => {
                return Err(ImageError::Io {
                    op: "rename",
                    path: work.to_path_buf(),
                    source,
                })
            }
        }
        sync_dir(&self.dir)
    }

    /// A fresh work directory path, `.tmp-<pid>-<n>-<id>`.
    fn work_dir(&self, id: &str) -> PathBuf {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join(format!("{TEMP_PREFIX}{}-{n}-{id}", std::process::id()))
    }

    fn remove_stale_temp_dirs(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(temp_dir_owner) else {
                continue;
            };
            if !Path::new("/proc").join(pid.to_string()).exists() {
                tracing::info!(path = %entry.path().display(), "removing stale image work dir");
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Creates `dest` (mode 0600) as a sparse file of `size_bytes` zeros.
///
/// Fails with [`ImageError::DestinationExists`] rather than touch an
/// existing file.
pub fn create_blank_disk(dest: &Path, size_bytes: u64) -> Result<(), ImageError> {
    let file = create_new(dest)?;
    let result = file.set_len(size_bytes).and_then(|()| file.sync_all());
    if let Err(source) = result {
        let _ = fs::remove_file(dest);
        return Err(ImageError::Io {
            op: "size",
            path: dest.to_path_buf(),
            source,
        });
    }
    Ok(())
}

/// Copies `src` to the new file `dest` (mode 0600): a reflink (`FICLONE`)
/// where the filesystem supports it, else a sparse copy that skips holes
/// and all-zero blocks. Either way `dest` is an independent file.
///
/// Fails with [`ImageError::DestinationExists`] rather than touch an
/// existing file; a partial `dest` is removed on failure.
pub fn clone_file(src: &Path, dest: &Path) -> Result<CloneMethod, ImageError> {
    let source = File::open(src).map_err(io_err("open", src))?;
    let target = create_new(dest)?;
    match clone_into(&source, &target).and_then(|m| target.sync_all().map(|()| m)) {
        Ok(method) => Ok(method),
        Err(e) => {
            let _ = fs::remove_file(dest);
            Err(ImageError::Clone {
                src: src.to_path_buf(),
                dest: dest.to_path_buf(),
                source: e,
            })
        }
    }
}

fn clone_into(src: &File, dest: &File) -> io::Result<CloneMethod> {
    if reflink(src, dest).is_ok() {
        return Ok(CloneMethod::Reflink);
    }
    let len = src.metadata()?.len();
    copy_sparse(src, dest, len, None)?;
    Ok(CloneMethod::SparseCopy)
}

/// Makes `dest` share all of `src`'s extents (`FICLONE`).
fn reflink(src: &File, dest: &File) -> io::Result<()> {
    let src_fd = libc::c_ulong::try_from(src.as_raw_fd())
        .map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
    // SAFETY: FICLONE takes the source descriptor by value and touches no
    // user memory; both files stay open for the duration of the call.
    let rc = unsafe { libc::ioctl(dest.as_raw_fd(), libc::FICLONE, src_fd) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn check_id(id: &str) -> Result<(), ImageError> {
    if names::is_valid_id(id) {
        Ok(())
    } else {
        Err(ImageError::InvalidId(id.to_string()))
    }
}

/// Copies the files into `work`, writes the metadata, and returns the
/// image with paths relative to the image directory.
fn build_image(
    work: &Path,
    id: &str,
    kernel: &Path,
    initrd: Option<&Path>,
    rootdisk: Option<&Path>,
) -> Result<Image, ImageError> {
    let store = |src: &Path, name: &str| store_file(src, &work.join(name));
    let image = Image {
        id: id.to_string(),
        kernel: KERNEL_FILE.into(),
        initrd: initrd.map(|_| INITRD_FILE.into()),
        rootdisk: rootdisk.map(|_| ROOTDISK_FILE.into()),
        kernel_sha256: store(kernel, KERNEL_FILE)?,
        initrd_sha256: initrd.map(|p| store(p, INITRD_FILE)).transpose()?,
        rootdisk_sha256: rootdisk.map(|p| store(p, ROOTDISK_FILE)).transpose()?,
        created_unix: now_unix(),
    };
    write_metadata(&work.join(METADATA_FILE), &image)?;
    sync_dir(work)?;
    Ok(image)
}

/// Copies `src` to the new file `dest` (sparse, read-only, synced) and
/// returns the hex SHA-256 of its content.
fn store_file(src: &Path, dest: &Path) -> Result<String, ImageError> {
    let source = File::open(src).map_err(io_err("open", src))?;
    let target = create_new(dest)?;
    let mut hasher = Sha256::new();
    let len = source.metadata().map_err(io_err("stat", src))?.len();
    copy_sparse(&source, &target, len, Some(&mut hasher)).map_err(io_err("copy", src))?;
    target.sync_all().map_err(io_err("sync", dest))?;
    fs::set_permissions(dest, Permissions::from_mode(0o444)).map_err(io_err("chmod", dest))?;
    Ok(to_hex(&hasher.finalize()))
}

fn write_metadata(path: &Path, image: &Image) -> Result<(), ImageError> {
    let json = serde_json::to_vec_pretty(image).map_err(|source| ImageError::Metadata {
        path: path.to_path_buf(),
        source,
    })?;
    let file = create_new(path)?;
    file.write_all_at(&json, 0)
        .and_then(|()| file.sync_all())
        .map_err(io_err("write", path))
}

/// Hex SHA-256 of the content of `path` (holes read as zeros).
fn hash_file(path: &Path) -> Result<String, ImageError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut offset = 0;
    loop {
        let n = file
            .read_at(&mut buf, offset)
            .map_err(io_err("read", path))?;
        if n == 0 {
            return Ok(to_hex(&hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
}

/// Copies the first `len` bytes of `src` to `dest`, writing only non-zero
/// blocks of the data regions, then sets `dest`'s length to `len`. Feeds
/// the full content (holes as zeros) to `hasher`.
fn copy_sparse(
    src: &File,
    dest: &File,
    len: u64,
    mut hasher: Option<&mut Sha256>,
) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut pos = 0;
    while pos < len {
        let data = next_data(src, pos, len);
        if let Some(h) = hasher.as_deref_mut() {
            hash_zeros(h, data - pos);
        }
        if data >= len {
            break;
        }
        let end = next_hole(src, data, len);
        copy_range(src, dest, data..end, &mut buf, hasher.as_deref_mut())?;
        pos = end;
    }
    dest.set_len(len)
}

/// Start of the next data region at or after `pos` (`len` if none). On
/// filesystems without `SEEK_DATA`, everything is data.
fn next_data(file: &File, pos: u64, len: u64) -> u64 {
    match seek(file, pos, libc::SEEK_DATA) {
        Ok(offset) => offset.min(len),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => len,
        Err(_) => pos,
    }
}

/// Start of the next hole after `pos` (`len` if none or unsupported).
fn next_hole(file: &File, pos: u64, len: u64) -> u64 {
    seek(file, pos, libc::SEEK_HOLE).map_or(len, |offset| offset.min(len))
}

fn seek(file: &File, pos: u64, whence: libc::c_int) -> io::Result<u64> {
    let pos = libc::off_t::try_from(pos).map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
    // SAFETY: lseek takes no pointers; it only moves the offset of an open
    // descriptor, which this module never relies on (it uses pread/pwrite).
    let offset = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
    u64::try_from(offset).map_err(|_| io::Error::last_os_error())
}

/// Copies `range` of `src` to the same offsets in `dest`, skipping
/// all-zero blocks, and hashes it.
fn copy_range(
    src: &File,
    dest: &File,
    range: std::ops::Range<u64>,
    buf: &mut [u8],
    mut hasher: Option<&mut Sha256>,
) -> io::Result<()> {
    let mut offset = range.start;
    while offset < range.end {
        let want = buf
            .len()
            .min(usize::try_from(range.end - offset).unwrap_or(usize::MAX));
        let n = src.read_at(&mut buf[..want], offset)?;
        if n == 0 {
            return Err(io::Error::new(
                ErrorKind::UnexpectedEof,
                "source shrank while copying",
            ));
        }
        if let Some(h) = hasher.as_deref_mut() {
            h.update(&buf[..n]);
        }
        write_nonzero_blocks(dest, &buf[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

/// Writes the runs of non-zero [`BLOCK_SIZE`] blocks of `chunk` at `offset`.
fn write_nonzero_blocks(dest: &File, chunk: &[u8], offset: u64) -> io::Result<()> {
    let mut run_start = None;
    for (i, block) in chunk.chunks(BLOCK_SIZE).enumerate() {
        let start = i * BLOCK_SIZE;
        let zero = block.iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(start),
            (true, Some(s)) => {
                dest.write_all_at(&chunk[s..start], offset + s as u64)?;
                run_start = None;
            }
            _ => {}
        }
    }
    match run_start {
        Some(s) => dest.write_all_at(&chunk[s..], offset + s as u64),
        None => Ok(()),
    }
}

fn hash_zeros(hasher: &mut Sha256, mut count: u64) {
    while count > 0 {
        let n = ZEROS
            .len()
            .min(usize::try_from(count).unwrap_or(usize::MAX));
        hasher.update(&ZEROS[..n]);
        count -= n as u64;
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        hex.push(char::from(DIGITS[usize::from(b >> 4)]));
        hex.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    hex
}

/// The pid in a work directory name `.tmp-<pid>-<n>-<id>`.
fn temp_dir_owner(name: &str) -> Option<u32> {
    name.strip_prefix(TEMP_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Creates a new file (mode 0600), refusing to open an existing one.
fn create_new(path: &Path) -> Result<File, ImageError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            ErrorKind::AlreadyExists => ImageError::DestinationExists(path.to_path_buf()),
            _ => ImageError::Io {
                op: "create",
                path: path.to_path_buf(),
                source: e,
            },
        })
}

fn sync_dir(dir: &Path) -> Result<(), ImageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Maps an `io::Error` to [`ImageError::Io`] for `op` on `path`.
fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests;

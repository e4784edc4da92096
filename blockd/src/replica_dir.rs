//! The replicas this host holds, converged to what the controller says
//! (`Hosts.WatchHostVolumes`): level-triggered, like netd's dataplane.
//!
//! Each replica is a sparse file `<dir>/vol-<16 hex>.vol` of the volume's
//! size with its epoch in `<id>.epoch` beside it, opened in this host's
//! [`Replica`] (which answers primaries over the wire). [`plan`] (pure)
//! compares the desired replicas with the files found and says what to do;
//! [`ReplicaDir::converge`] does it, raises the epoch of every replica to
//! the volume's (also of one out of sync: the primary resyncs it at that
//! epoch, and every older primary stays fenced by it; the controller does
//! not count it held, and no primary reads from it, until the resync puts
//! it back in sync), and returns what this host holds with each replica's
//! own epoch, for `Hosts.ReportVolumeReplicas`.
//!
//! Nothing is deleted that the controller did not name: a replica file of
//! a volume the controller no longer lists (a volume deleted while this
//! host was away, or a controller that lost its state) is moved to
//! `<dir>/orphans/` and reported in the log, never removed; a file that is
//! not a replica's is left alone. Only a volume the controller marks
//! `deleting` has its replica removed. A replica file of the wrong size
//! is left as it is and not reported held (its volume stays `creating`
//! and the log says why).
//!
//! Each replica file has an incarnation: a random number chosen when the
//! file is made, kept in `<id>.inc` beside it and reported with it. A
//! file made again (the disk was replaced, or the file vanished) is blank
//! under the same name; its new incarnation tells the controller, which
//! takes that replica out of sync instead of counting a blank copy as one
//! of the volume's good ones. An incarnation file that cannot be read is
//! moved aside (`<id>.inc.bad.<unix seconds>`), never deleted, and the
//! replica reported with none (0): only making a file makes a new
//! incarnation, so a good replica is never reported as made again.
//!
//! Catching a replica that fell out of sync up from its peers (resync) is
//! the serving primary's ([`crate::replication::ReplicatedStore::resync`],
//! started by [`crate::serve`]).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use ferro_proto::compute::v1::{HeldReplica, HostVolumes};
use ferro_proto::is_volume_id;

use crate::replica::Replica;

/// Errors of the replica directory.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaDirError {
    /// The directory could not be created or listed.
    #[error("replica directory {0}")]
    Dir(PathBuf, #[source] io::Error),
}

/// One action on the replica directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Make the sparse file of volume `id`, `size` bytes, filled from
    /// `source` when given (a root volume made from an image).
    Create {
        /// Volume id.
        id: String,
        /// Bytes.
        size: u64,
        /// A raw image file on this host to copy in.
        source: Option<PathBuf>,
    },
    /// Remove volume `id`'s replica (the controller deletes the volume).
    Remove {
        /// Volume id.
        id: String,
    },
    /// Move the replica of volume `id`, unknown to the controller, aside.
    Orphan {
        /// Volume id.
        id: String,
    },
    /// Volume `id`'s file has `found` bytes, not `wanted`: left alone.
    WrongSize {
        /// Volume id.
        id: String,
        /// Its file's size.
        found: u64,
        /// The volume's size.
        wanted: u64,
    },
}

/// What to do, given the desired replicas and the files found (volume id
/// → size), and the replicas then to keep open (volume id → the epoch to
/// raise it to; one out of sync takes it too, to be resynced at it).
/// The `Option` is kept for a replica whose epoch is not to be raised;
/// every listed replica takes the volume's epoch today.
pub fn plan(
    desired: &HostVolumes,
    found: &BTreeMap<String, u64>,
) -> (Vec<Action>, BTreeMap<String, Option<u64>>) {
    let mut actions = Vec::new();
    let mut held = BTreeMap::new();
    let mut listed = std::collections::BTreeSet::new();
    for r in &desired.replicas {
        if !is_volume_id(&r.volume_id) {
            continue;
        }
        listed.insert(r.volume_id.as_str());
        match (found.get(&r.volume_id), r.deleting) {
            (Some(_), true) => actions.push(Action::Remove {
                id: r.volume_id.clone(),
            }),
            (None, true) => {}
            (None, false) => {
                actions.push(Action::Create {
                    id: r.volume_id.clone(),
                    size: r.size_bytes,
                    source: (!r.source_path.is_empty()).then(|| PathBuf::from(&r.source_path)),
                });
                held.insert(r.volume_id.clone(), Some(r.epoch));
            }
            (Some(&size), false) if size == r.size_bytes => {
                held.insert(r.volume_id.clone(), Some(r.epoch));
            }
            (Some(&size), false) => actions.push(Action::WrongSize {
                id: r.volume_id.clone(),
                found: size,
                wanted: r.size_bytes,
            }),
        }
    }
    for id in found.keys().filter(|id| !listed.contains(id.as_str())) {
        actions.push(Action::Orphan { id: id.clone() });
    }
    (actions, held)
}

/// The directory of this host's replicas.
#[derive(Clone)]
pub struct ReplicaDir {
    dir: PathBuf,
    replica: Arc<Replica>,
}

impl ReplicaDir {
    /// `dir`, created if missing, with no replica open yet.
    pub fn open(dir: &Path) -> Result<Self, ReplicaDirError> {
        std::fs::create_dir_all(dir).map_err(|e| ReplicaDirError::Dir(dir.to_path_buf(), e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            replica: Arc::new(Replica::new(dir)),
        })
    }

    /// The replicas, as the replica server answers for them.
    pub fn replica(&self) -> Arc<Replica> {
        self.replica.clone()
    }

    /// Volume `id`'s replica file.
    pub fn path(&self, id: &str) -> PathBuf {
        self.replica.data_path(id)
    }

    /// The replica files present: volume id → size.
    pub fn found(&self) -> Result<BTreeMap<String, u64>, ReplicaDirError> {
        let err = |e| ReplicaDirError::Dir(self.dir.clone(), e);
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(&self.dir).map_err(err)? {
            let e = e.map_err(err)?;
            let name = e.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".vol")) else {
                continue;
            };
            if !is_volume_id(id) {
                continue;
            }
            let meta = e.metadata().map_err(err)?;
            if meta.is_file() {
                out.insert(id.to_string(), meta.len());
            }
        }
        Ok(out)
    }

    /// Converge to `desired`; what is held afterwards (each replica with
    /// its own epoch), to report. A step that fails is logged and its
    /// volume not reported held; the others go on.
    pub fn converge(&self, desired: &HostVolumes) -> Result<Vec<HeldReplica>, ReplicaDirError> {
        let found = self.found()?;
        let (actions, keep) = plan(desired, &found);
        let mut failed = std::collections::BTreeSet::new();
        for a in actions {
            if let Err(e) = self.apply(&a) {
                let id = match &a {
                    Action::Create { id, .. }
                    | Action::Remove { id }
                    | Action::Orphan { id }
                    | Action::WrongSize { id, .. } => id,
                };
                tracing::error!(volume_id = %id, "{a:?} failed: {e}");
                failed.insert(id.clone());
            }
        }
        let mut held = Vec::new();
        for (id, epoch) in keep.into_iter().filter(|(id, _)| !failed.contains(id)) {
            let listed = desired.replicas.iter().find(|r| r.volume_id == id);
            let size = listed.map_or(0, |r| r.size_bytes);
            let known = listed.map_or(0, |r| r.incarnation);
            let incarnation = match self.incarnation(&id) {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(volume_id = %id, "cannot keep the replica's incarnation: {e}");
                    continue;
                }
            };
            if known != 0 && incarnation != 0 && known != incarnation {
                // Made again (blank) since the controller last heard: not
                // opened, so it takes no frame and is no primary's copy,
                // until the controller has recorded it (and taken it out of
                // sync); reported at no epoch meanwhile.
                self.replica.close_volume(&id);
                tracing::warn!(volume_id = %id, known, incarnation,
                    "replica file made again: held back until the controller records it");
                held.push(HeldReplica {
                    volume_id: id,
                    epoch: 0,
                    incarnation,
                });
                continue;
            }
            if self.replica.epoch(&id).is_none() {
                if let Err(e) = self.replica.open_volume(&id, size) {
                    tracing::error!(volume_id = %id, "cannot open the replica: {e}");
                    continue;
                }
            }
            if let Some(epoch) = epoch {
                if let Err(e) = self.replica.set_epoch(&id, epoch) {
                    tracing::error!(volume_id = %id, epoch, "cannot take the volume's epoch: {e}");
                }
            }
            if let Some(epoch) = self.replica.epoch(&id) {
                held.push(HeldReplica {
                    volume_id: id,
                    epoch,
                    incarnation,
                });
            }
        }
        Ok(held)
    }

    /// Volume `id`'s incarnation file.
    pub fn incarnation_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.inc"))
    }

    /// Volume `id`'s incarnation, from its file; 0 (not known) when there
    /// is none (a replica made by a blockd from before incarnations) or it
    /// cannot be read (moved aside). Only making the replica file makes a
    /// new one: a data file found without its incarnation was not made
    /// again by this blockd (the incarnation is written first), so it is
    /// not reported as new, which would take a good replica out of sync.
    pub fn incarnation(&self, id: &str) -> io::Result<u64> {
        let path = self.incarnation_path(id);
        match std::fs::read_to_string(&path) {
            Ok(text) => match parse_incarnation(&text) {
                Some(n) => Ok(n),
                None => {
                    let to = self.dir.join(format!("{id}.inc.bad.{}", unix_seconds()));
                    std::fs::rename(&path, &to)?;
                    tracing::warn!(volume_id = %id, moved_to = %to.display(),
                        "unreadable incarnation file moved aside; incarnation not known");
                    Ok(0)
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Chooses a new incarnation for volume `id` and writes its file
    /// (through a temporary name, synced).
    fn new_incarnation(&self, id: &str) -> io::Result<u64> {
        let n = random_nonzero()?;
        let tmp = self.dir.join(format!(".{id}.inc.new"));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, format!("{n}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.incarnation_path(id))?;
        sync_dir(&self.dir)?;
        Ok(n)
    }

    fn apply(&self, a: &Action) -> io::Result<()> {
        match a {
            Action::Create { id, size, source } => {
                let path = self.path(id);
                // A replica still open on a file that vanished would go on
                // writing into it: let the new file be the one opened.
                self.replica.close_volume(id);
                // A temporary name first: a crash (or a bad source) never
                // leaves a replica file of the wrong size or half filled
                // under the real name.
                let tmp = self.dir.join(format!(".{id}.vol.new"));
                let mut f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&tmp)?;
                if let Some(src) = source {
                    if let Err(e) = fill_from(&mut f, src, *size) {
                        drop(f);
                        let _ = std::fs::remove_file(&tmp);
                        return Err(e);
                    }
                }
                f.set_len(*size)?;
                f.sync_all()?;
                // A new file, a new incarnation, before the file takes its
                // name: a crash in between makes both again next time.
                self.new_incarnation(id)?;
                std::fs::rename(&tmp, &path)?;
                sync_dir(&self.dir)?;
                tracing::info!(volume_id = %id, size, source = ?source, "replica created");
            }
            Action::Remove { id } => {
                self.replica.close_volume(id);
                std::fs::remove_file(self.path(id))?;
                for side in [self.replica.epoch_path(id), self.incarnation_path(id)] {
                    match std::fs::remove_file(side) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                        _ => {}
                    }
                }
                sync_dir(&self.dir)?;
                tracing::info!(volume_id = %id, "replica removed: the volume is deleted");
            }
            Action::Orphan { id } => {
                let orphans = self.dir.join("orphans");
                std::fs::create_dir_all(&orphans)?;
                let stamp = unix_seconds();
                self.replica.close_volume(id);
                let to = orphans.join(format!("{id}.vol.{stamp}"));
                std::fs::rename(self.path(id), &to)?;
                for (side, ext) in [
                    (self.replica.epoch_path(id), "epoch"),
                    (self.incarnation_path(id), "inc"),
                ] {
                    if side.exists() {
                        std::fs::rename(&side, orphans.join(format!("{id}.{ext}.{stamp}")))?;
                    }
                }
                sync_dir(&self.dir)?;
                tracing::warn!(
                    volume_id = %id,
                    moved_to = %to.display(),
                    "replica of a volume the controller does not list: moved aside, not deleted"
                );
            }
            Action::WrongSize { id, found, wanted } => {
                tracing::error!(
                    volume_id = %id,
                    found,
                    wanted,
                    "replica file has the wrong size: left alone, not reported held"
                );
            }
        }
        Ok(())
    }
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An incarnation file's number: decimal, non-zero, one line.
fn parse_incarnation(text: &str) -> Option<u64> {
    text.trim_end_matches('\n')
        .parse::<u64>()
        .ok()
        .filter(|&n| n != 0)
}

/// A random non-zero number from the kernel.
fn random_nonzero() -> io::Result<u64> {
    loop {
        let mut b = [0u8; 8];
        getrandom::getrandom(&mut b).map_err(|e| io::Error::other(e.to_string()))?;
        let n = u64::from_ne_bytes(b);
        if n != 0 {
            return Ok(n);
        }
    }
}

/// Copy the raw image `src` into the start of `f` (a new, empty file),
/// leaving holes where the image has zeros. Refused when the image does
/// not fit in `size` bytes.
fn fill_from(f: &mut std::fs::File, src: &Path, size: u64) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let named = |e: io::Error| io::Error::new(e.kind(), format!("image {}: {e}", src.display()));
    let mut image = std::fs::File::open(src).map_err(named)?;
    let len = image.metadata().map_err(named)?.len();
    if len > size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "image {} is {len} bytes, more than the volume's {size}",
                src.display()
            ),
        ));
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            match image.read(&mut buf[n..]).map_err(named)? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            f.seek(SeekFrom::Start(at))?;
            f.write_all(&buf[..n])?;
        }
        at += n as u64;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferro_proto::compute::v1::ReplicaOnHost;

    const A: &str = "vol-000000000000000a";
    const B: &str = "vol-000000000000000b";
    const C: &str = "vol-000000000000000c";

    fn want(replicas: &[(&str, u64, bool)]) -> HostVolumes {
        HostVolumes {
            replicas: replicas
                .iter()
                .map(|(id, size, deleting)| ReplicaOnHost {
                    volume_id: id.to_string(),
                    size_bytes: *size,
                    epoch: 3,
                    deleting: *deleting,
                    in_sync: true,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn plan_creates_removes_and_moves_aside_what_is_not_listed() {
        let found = BTreeMap::from([(B.to_string(), 100), (C.to_string(), 7)]);
        let (actions, held) = plan(
            &want(&[(A, 10, false), (B, 100, true), ("../x", 1, false)]),
            &found,
        );
        assert_eq!(
            actions,
            [
                Action::Create {
                    id: A.into(),
                    size: 10,
                    source: None,
                },
                Action::Remove { id: B.into() },
                Action::Orphan { id: C.into() },
            ]
        );
        assert_eq!(held, BTreeMap::from([(A.to_string(), Some(3))]));
        // Converged: nothing to do, the same held.
        let found = BTreeMap::from([(A.to_string(), 10)]);
        let (actions, held2) = plan(&want(&[(A, 10, false), (B, 100, true)]), &found);
        assert!(actions.is_empty(), "{actions:?}");
        assert_eq!(held2, held);
    }

    #[test]
    fn a_file_of_the_wrong_size_is_left_alone_and_not_held() {
        let found = BTreeMap::from([(A.to_string(), 5)]);
        let (actions, held) = plan(&want(&[(A, 10, false)]), &found);
        assert_eq!(
            actions,
            [Action::WrongSize {
                id: A.into(),
                found: 5,
                wanted: 10
            }]
        );
        assert!(held.is_empty());
    }

    #[test]
    fn converge_on_disk_never_deletes_what_was_not_named() {
        let dir = std::env::temp_dir().join(format!("ferro-replicas-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let d = ReplicaDir::open(&dir).unwrap();
        std::fs::write(dir.join("notes.txt"), b"not a replica").unwrap();
        std::fs::write(d.path(C), b"orphan data").unwrap();
        let held = d.converge(&want(&[(A, 1 << 20, false)])).unwrap();
        let born = held[0].incarnation;
        assert_ne!(born, 0);
        assert_eq!(
            held,
            [HeldReplica {
                volume_id: A.into(),
                epoch: 3,
                incarnation: born,
            }]
        );
        assert_eq!(d.replica().epoch(A), Some(3), "open, at the epoch");
        // Out of sync: the epoch is raised too (a resync runs at it).
        let mut behind = want(&[(A, 1 << 20, false)]);
        behind.replicas[0].epoch = 4;
        behind.replicas[0].in_sync = false;
        let held = d.converge(&behind).unwrap();
        assert_eq!(held[0].epoch, 4);
        // A restarted blockd opens what it finds, at its own epoch, and
        // never goes back to an older one.
        let again = ReplicaDir::open(&dir).unwrap();
        behind.replicas[0].epoch = 2;
        assert_eq!(again.converge(&behind).unwrap()[0].epoch, 4);
        assert_eq!(std::fs::metadata(d.path(A)).unwrap().len(), 1 << 20);
        assert!(dir.join("notes.txt").exists(), "not ours: left alone");
        assert!(!d.path(C).exists());
        let moved: Vec<_> = std::fs::read_dir(dir.join("orphans")).unwrap().collect();
        assert_eq!(moved.len(), 1, "the orphan is kept aside");
        // Deleting removes it; the report no longer names it.
        let held = d.converge(&want(&[(A, 1 << 20, true)])).unwrap();
        assert!(held.is_empty());
        assert!(!d.path(A).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A replica keeps its incarnation across restarts; a file made again
    /// (it vanished) gets a new one; one whose incarnation file is
    /// unreadable (kept aside, not deleted) is reported with none.
    #[test]
    fn a_replica_made_again_reports_a_new_incarnation() {
        let dir = std::env::temp_dir().join(format!("ferro-replicas-inc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let d = ReplicaDir::open(&dir).unwrap();
        let w = want(&[(A, 1 << 20, false)]);
        let first = d.converge(&w).unwrap()[0].incarnation;
        assert_eq!(d.converge(&w).unwrap()[0].incarnation, first);
        let restarted = ReplicaDir::open(&dir).unwrap();
        assert_eq!(restarted.converge(&w).unwrap()[0].incarnation, first);
        // The disk lost the file: it is made again, blank, and says so.
        // While the controller still knows the first incarnation, the new
        // file is reported at no epoch and not opened (no frame lands on
        // it, no primary takes it as its copy); once the controller has
        // recorded the new one, it is opened as any replica.
        std::fs::remove_file(restarted.path(A)).unwrap();
        let mut told = w.clone();
        told.replicas[0].incarnation = first;
        let held = restarted.converge(&told).unwrap();
        let second = held[0].incarnation;
        assert_ne!(second, first);
        assert_eq!(held[0].epoch, 0);
        assert!(
            restarted.replica().local(A).is_none(),
            "held back, yet open"
        );
        told.replicas[0].incarnation = second;
        let held = restarted.converge(&told).unwrap();
        assert_eq!((held[0].epoch, held[0].incarnation), (3, second));
        assert!(restarted.replica().local(A).is_some());
        assert_eq!(std::fs::metadata(restarted.path(A)).unwrap().len(), 1 << 20);
        // Garbage in the incarnation file: moved aside, and the replica,
        // whose data is intact, reported with none rather than a new one.
        std::fs::write(restarted.incarnation_path(A), b"not a number").unwrap();
        assert_eq!(restarted.converge(&w).unwrap()[0].incarnation, 0);
        let aside: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(&format!("{A}.inc.bad.")))
            .collect();
        assert_eq!(aside.len(), 1, "the unreadable file is kept: {aside:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_replica_made_from_an_image_holds_its_bytes_and_a_too_big_image_is_refused() {
        let dir = std::env::temp_dir().join(format!("ferro-replicas-src-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let d = ReplicaDir::open(&dir).unwrap();
        let image = dir.join("image.raw");
        let mut bytes = vec![0u8; (3 << 20) + 512];
        bytes[..4].copy_from_slice(b"boot");
        bytes[(2 << 20) + 7] = 0x5a;
        std::fs::write(&image, &bytes).unwrap();
        let mut w = want(&[(A, 4 << 20, false), (B, 1 << 20, false)]);
        for r in &mut w.replicas {
            r.source_path = image.display().to_string();
        }
        let held = d.converge(&w).unwrap();
        assert_eq!(held.len(), 1, "only A fits the image: {held:?}");
        assert_eq!(held[0].volume_id, A);
        let got = std::fs::read(d.path(A)).unwrap();
        assert_eq!(got.len(), 4 << 20);
        assert_eq!(&got[..bytes.len()], &bytes[..]);
        assert!(got[bytes.len()..].iter().all(|&b| b == 0));
        assert!(!d.path(B).exists(), "nothing half made under the real name");
        assert!(!dir.join(format!(".{B}.vol.new")).exists());
        // A missing image is an error too, not a blank volume.
        let mut w = want(&[(C, 4 << 20, false)]);
        w.replicas[0].source_path = dir.join("missing.raw").display().to_string();
        assert!(d.converge(&w).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

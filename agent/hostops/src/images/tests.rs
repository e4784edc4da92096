use std::os::unix::fs::MetadataExt;

use super::*;
use crate::test_util::TempDir;

const MIB: u64 = 1 << 20;
const SHA256_ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

/// A scratch area with a store in `store/` and source files in `src/`.
struct Fixture {
    tmp: TempDir,
    store: ImageStore,
}

impl Fixture {
    fn new() -> Self {
        let tmp = TempDir::new("img");
        let store = ImageStore::open(&tmp.path().join("store")).unwrap();
        Fixture { tmp, store }
    }

    fn source(&self, name: &str, content: &[u8]) -> PathBuf {
        let path = self.tmp.path().join(name);
        fs::write(&path, content).unwrap();
        path
    }

    /// A 32 MiB sparse disk with data at the start, in the middle and at
    /// the end, plus 1 MiB of explicitly written zeros.
    fn sparse_disk(&self) -> PathBuf {
        let path = self.tmp.path().join("disk.raw");
        let file = File::create(&path).unwrap();
        file.set_len(32 * MIB).unwrap();
        file.write_all_at(&[0xaa; 4096], 0).unwrap();
        let pattern: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 + 1).collect();
        file.write_all_at(&pattern, 10 * MIB).unwrap();
        file.write_all_at(&vec![0; MIB as usize], 20 * MIB).unwrap();
        file.write_all_at(b"the end", 32 * MIB - 7).unwrap();
        file.sync_all().unwrap();
        path
    }

    fn store_entries(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }
}

fn blocks(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks()
}

fn sha256_of(path: &Path) -> String {
    to_hex(&Sha256::digest(fs::read(path).unwrap()))
}

#[test]
fn register_get_list_roundtrip() {
    let f = Fixture::new();
    let kernel = f.source("vmlinux", b"abc");
    let initrd = f.source("initrd.img", b"initrd bytes");
    let image = f
        .store
        .register("ubuntu-24", &kernel, Some(&initrd), None)
        .unwrap();

    let dir = f.store.dir().join("ubuntu-24");
    assert_eq!(image.id, "ubuntu-24");
    assert_eq!(image.kernel, dir.join("kernel"));
    assert_eq!(image.initrd, Some(dir.join("initrd")));
    assert_eq!(image.rootdisk, None);
    assert_eq!(image.kernel_sha256, SHA256_ABC);
    assert_eq!(image.initrd_sha256, Some(sha256_of(&initrd)));
    assert_eq!(image.rootdisk_sha256, None);
    assert!(image.created_unix.abs_diff(now_unix()) < 60);
    assert_eq!(fs::read(&image.kernel).unwrap(), b"abc");
    assert_eq!(
        fs::metadata(&image.kernel).unwrap().mode() & 0o222,
        0,
        "stored files are read-only"
    );
    assert!(dir.join(METADATA_FILE).is_file());

    assert_eq!(f.store.get("ubuntu-24").unwrap(), image);
    let reopened = ImageStore::open(f.store.dir()).unwrap();
    assert_eq!(reopened.list(), [image]);
    assert_eq!(f.store_entries(), ["ubuntu-24"], "no work dirs left");
}

#[test]
fn metadata_paths_are_relative_on_disk() {
    let f = Fixture::new();
    f.store
        .register("rel", &f.source("k", b"k"), None, None)
        .unwrap();
    let json = fs::read_to_string(f.store.dir().join("rel").join(METADATA_FILE)).unwrap();
    let on_disk: Image = serde_json::from_str(&json).unwrap();
    assert_eq!(on_disk.kernel, Path::new("kernel"));
}

#[test]
fn duplicate_id_is_rejected() {
    let f = Fixture::new();
    let first = f
        .store
        .register("img", &f.source("k1", b"one"), None, None)
        .unwrap();
    let err = f
        .store
        .register("img", &f.source("k2", b"two"), None, None)
        .unwrap_err();
    assert!(
        matches!(&err, ImageError::AlreadyExists(id) if id == "img"),
        "{err}"
    );
    assert_eq!(fs::read(&first.kernel).unwrap(), b"one");
    assert_eq!(f.store_entries(), ["img"]);
}

#[test]
fn failed_register_leaves_nothing() {
    let f = Fixture::new();
    let kernel = f.source("k", b"kernel");
    let missing = f.tmp.path().join("no-such-initrd");
    let err = f
        .store
        .register("img", &kernel, Some(&missing), None)
        .unwrap_err();
    assert!(
        matches!(&err, ImageError::Io { path, .. } if path == &missing),
        "{err}"
    );
    assert!(err.to_string().contains("no-such-initrd"), "{err}");
    assert!(f.store_entries().is_empty(), "{:?}", f.store_entries());
    assert!(matches!(f.store.get("img"), Err(ImageError::NotFound(_))));
}

#[test]
fn invalid_ids_are_rejected() {
    let f = Fixture::new();
    let kernel = f.source("k", b"k");
    let dest = f.tmp.path().join("d");
    for id in [
        "",
        ".",
        "..",
        "../escape",
        "a/b",
        ".tmp-1-0-x",
        &"x".repeat(65),
    ] {
        let invalid = |r: Result<_, ImageError>| matches!(r, Err(ImageError::InvalidId(_)));
        assert!(
            invalid(f.store.register(id, &kernel, None, None).map(drop)),
            "{id:?}"
        );
        assert!(invalid(f.store.get(id).map(drop)), "{id:?}");
        assert!(invalid(f.store.remove(id)), "{id:?}");
        assert!(invalid(f.store.verify(id)), "{id:?}");
        assert!(invalid(f.store.clone_disk(id, &dest)), "{id:?}");
    }
    assert!(f.store_entries().is_empty());
    assert!(!f.tmp.path().join("escape").exists());
}

#[test]
fn missing_and_removed_images_are_not_found() {
    let f = Fixture::new();
    assert!(matches!(f.store.get("nope"), Err(ImageError::NotFound(id)) if id == "nope"));
    f.store
        .register("gone", &f.source("k", b"k"), None, None)
        .unwrap();
    f.store.remove("gone").unwrap();
    assert!(matches!(f.store.get("gone"), Err(ImageError::NotFound(_))));
    assert!(matches!(
        f.store.remove("gone"),
        Err(ImageError::NotFound(_))
    ));
    assert!(f.store.list().is_empty());
    assert!(f.store_entries().is_empty());
}

#[test]
fn corrupt_metadata_is_reported_and_skipped_by_list() {
    let f = Fixture::new();
    let good = f
        .store
        .register("good", &f.source("k", b"k"), None, None)
        .unwrap();
    fs::create_dir(f.store.dir().join("bad")).unwrap();
    fs::write(f.store.dir().join("bad").join(METADATA_FILE), "{not json").unwrap();
    let err = f.store.get("bad").unwrap_err();
    assert!(matches!(err, ImageError::Metadata { .. }), "{err}");
    assert_eq!(f.store.list(), [good]);
}

#[test]
fn verify_detects_tampering() {
    let f = Fixture::new();
    let image = f
        .store
        .register(
            "v",
            &f.source("k", b"kernel"),
            None,
            Some(&f.source("d", b"disk")),
        )
        .unwrap();
    f.store.verify("v").unwrap();
    let disk = image.rootdisk.unwrap();
    fs::set_permissions(&disk, Permissions::from_mode(0o644)).unwrap();
    fs::write(&disk, b"DISK").unwrap();
    let err = f.store.verify("v").unwrap_err();
    assert!(
        matches!(&err, ImageError::HashMismatch { path, .. } if path == &disk),
        "{err}"
    );
}

#[test]
fn register_and_clone_keep_holes_and_content() {
    let f = Fixture::new();
    let src = f.sparse_disk();
    let image = f
        .store
        .register("disk", &f.source("k", b"k"), None, Some(&src))
        .unwrap();
    let stored = image.rootdisk.clone().unwrap();
    assert_eq!(image.rootdisk_sha256, Some(sha256_of(&src)));
    assert_eq!(fs::read(&stored).unwrap(), fs::read(&src).unwrap());
    // The explicit zero MiB becomes a hole too.
    assert!(
        blocks(&stored) < blocks(&src),
        "{} vs {}",
        blocks(&stored),
        blocks(&src)
    );

    let dest = f.tmp.path().join("instance-root.raw");
    f.store.clone_disk("disk", &dest).unwrap();
    assert_eq!(fs::metadata(&dest).unwrap().len(), 32 * MIB);
    assert_eq!(fs::read(&dest).unwrap(), fs::read(&src).unwrap());
    let data_blocks = (4096 + MIB + 4096) / 512;
    assert!(
        blocks(&dest) <= data_blocks + 64,
        "clone not sparse: {} blocks",
        blocks(&dest)
    );
    assert_eq!(fs::metadata(&dest).unwrap().mode() & 0o777, 0o600);

    // The clone is the instance's own file: writing it leaves the image intact.
    File::options()
        .write(true)
        .open(&dest)
        .unwrap()
        .write_all_at(b"guest data", 0)
        .unwrap();
    f.store.verify("disk").unwrap();
}

#[test]
fn clone_refuses_existing_destination_and_missing_disk() {
    let f = Fixture::new();
    f.store
        .register("nodisk", &f.source("k", b"k"), None, None)
        .unwrap();
    f.store
        .register(
            "disk",
            &f.source("k2", b"k"),
            None,
            Some(&f.source("d", b"root")),
        )
        .unwrap();
    let dest = f.source("existing.raw", b"do not touch");
    let err = f.store.clone_disk("disk", &dest).unwrap_err();
    assert!(
        matches!(&err, ImageError::DestinationExists(p) if p == &dest),
        "{err}"
    );
    assert_eq!(fs::read(&dest).unwrap(), b"do not touch");

    let fresh = f.tmp.path().join("fresh.raw");
    assert!(matches!(
        f.store.clone_disk("nodisk", &fresh),
        Err(ImageError::NoRootDisk(_))
    ));
    assert!(matches!(
        f.store.clone_disk("absent", &fresh),
        Err(ImageError::NotFound(_))
    ));
    assert!(!fresh.exists());
}

#[test]
fn clone_file_copies_independently() {
    let f = Fixture::new();
    let src = f.sparse_disk();
    let dest = f.tmp.path().join("copy.raw");
    let method = clone_file(&src, &dest).unwrap();
    // ext4/tmpfs have no reflinks; XFS/btrfs would.
    assert!(matches!(
        method,
        CloneMethod::Reflink | CloneMethod::SparseCopy
    ));
    assert_eq!(fs::read(&dest).unwrap(), fs::read(&src).unwrap());
    assert!(matches!(
        clone_file(&f.tmp.path().join("none"), &f.tmp.path().join("x")),
        Err(ImageError::Io { .. })
    ));
    assert!(!f.tmp.path().join("x").exists());
}

#[test]
fn blank_disk_is_sparse() {
    let f = Fixture::new();
    let dest = f.tmp.path().join("blank.raw");
    f.store.create_blank_disk(&dest, 64 * MIB).unwrap();
    assert_eq!(fs::metadata(&dest).unwrap().len(), 64 * MIB);
    assert_eq!(blocks(&dest), 0);
    let mut head = [1u8; 4096];
    File::open(&dest)
        .unwrap()
        .read_exact_at(&mut head, 32 * MIB)
        .unwrap();
    assert!(head.iter().all(|&b| b == 0));
    let err = create_blank_disk(&dest, MIB).unwrap_err();
    assert!(matches!(err, ImageError::DestinationExists(_)), "{err}");
    assert_eq!(fs::metadata(&dest).unwrap().len(), 64 * MIB);
}

#[test]
fn stale_work_dirs_of_dead_processes_are_removed() {
    let f = Fixture::new();
    let stale = f.store.dir().join(".tmp-4294967295-0-old");
    let live = f
        .store
        .dir()
        .join(format!(".tmp-{}-999-new", std::process::id()));
    for dir in [&stale, &live] {
        fs::create_dir(dir).unwrap();
        fs::write(dir.join("kernel"), b"partial").unwrap();
    }
    let reopened = ImageStore::open(f.store.dir()).unwrap();
    assert!(!stale.exists());
    assert!(live.exists());
    assert!(reopened.list().is_empty());
}

#[test]
fn sparse_copy_hash_matches_plain_hash() {
    let f = Fixture::new();
    let src = f.sparse_disk();
    let dest = f.tmp.path().join("hashed.raw");
    let mut hasher = Sha256::new();
    let source = File::open(&src).unwrap();
    let target = File::create(&dest).unwrap();
    copy_sparse(&source, &target, 32 * MIB, Some(&mut hasher)).unwrap();
    assert_eq!(to_hex(&hasher.finalize()), hash_file(&src).unwrap());
    assert_eq!(hash_file(&src).unwrap(), sha256_of(&src));
}

#[test]
fn helpers() {
    assert_eq!(to_hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    assert_eq!(temp_dir_owner(".tmp-123-4-img"), Some(123));
    assert_eq!(temp_dir_owner(".tmp-x-4-img"), None);
    assert_eq!(temp_dir_owner("img"), None);
}

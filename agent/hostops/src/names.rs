//! Validation of caller-supplied names that end up in paths or ioctls.

/// Longest instance or image id accepted.
pub(crate) const MAX_ID_LEN: usize = 64;

/// Longest interface name the kernel accepts (`IFNAMSIZ - 1`).
pub(crate) const MAX_IFNAME_LEN: usize = 15;

/// True for an id of 1..=64 characters from `[A-Za-z0-9_-]`.
///
/// Such an id can never be `.`/`..` or contain `/`, so it is safe to join
/// onto a directory.
pub fn is_valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len()) && id.bytes().all(is_id_byte)
}

/// True for a relative path of one or more `/`-separated components, each
/// made of `[A-Za-z0-9_.-]` and none being `.` or `..` (e.g. `ferro` or
/// `machine.slice/ferro`).
pub(crate) fn is_valid_rel_path(path: &str) -> bool {
    !path.is_empty() && path.split('/').all(is_valid_component)
}

/// True for an interface name of 1..=15 bytes from `[A-Za-z0-9_.-]`, other
/// than `.` and `..`.
pub(crate) fn is_valid_ifname(name: &str) -> bool {
    name.len() <= MAX_IFNAME_LEN && is_valid_component(name)
}

fn is_valid_component(c: &str) -> bool {
    !c.is_empty() && c != "." && c != ".." && c.bytes().all(|b| is_id_byte(b) || b == b'.')
}

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(is_valid_id("i-0123_abc"));
        assert!(is_valid_id(&"a".repeat(64)));
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "../x",
            "a.b",
            "a b",
            "é",
            &"a".repeat(65),
        ] {
            assert!(!is_valid_id(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn rel_paths() {
        assert!(is_valid_rel_path("ferro"));
        assert!(is_valid_rel_path("machine.slice/ferro-1"));
        for bad in ["", "/ferro", "ferro/", "a//b", "..", "a/../b", "./a", "a b"] {
            assert!(!is_valid_rel_path(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn ifnames() {
        assert!(is_valid_ifname("tap0"));
        assert!(is_valid_ifname("eth0.100"));
        assert!(is_valid_ifname(&"t".repeat(15)));
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "a%d", &"t".repeat(16)] {
            assert!(!is_valid_ifname(bad), "{bad:?} accepted");
        }
    }
}

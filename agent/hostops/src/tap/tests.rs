use super::*;
use crate::test_util::is_root;

/// A unique interface name: `f<pid><tag>`, at most 15 bytes.
fn unique(tag: &str) -> String {
    let name = format!("f{}{tag}", std::process::id());
    assert!(name.len() <= names::MAX_IFNAME_LEN, "{name} too long");
    name
}

/// Deletes the named taps and bridges on drop, even if the test panicked.
#[derive(Default)]
struct Cleanup {
    taps: Vec<String>,
    bridges: Vec<String>,
}

impl Cleanup {
    /// Fails the test when not root (never `None`).
    fn new() -> Option<Self> {
        if !is_root() {
            // Tests never skip: a missing precondition fails them.
            panic!("precondition missing: tap tests need root");
        }
        Some(Cleanup::default())
    }

    fn tap(&mut self, tag: &str) -> String {
        let name = unique(tag);
        self.taps.push(name.clone());
        name
    }

    fn bridge(&mut self, tag: &str) -> String {
        let name = unique(tag);
        self.bridges.push(name.clone());
        name
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.taps.iter().for_each(|t| drop(delete_tap(t)));
        self.bridges.iter().for_each(|b| drop(delete_bridge(b)));
    }
}

fn is_up(name: &str) -> bool {
    let flags = fs::read_to_string(sys_net(name).join("flags")).unwrap();
    parse_hex(&flags).unwrap() & 1 != 0
}

#[test]
fn tap_create_exists_list_delete() {
    let Some(mut c) = Cleanup::new() else { return };
    let tap = c.tap("t0");
    assert!(!tap_exists(&tap));
    create_tap(&tap).unwrap();
    assert!(tap_exists(&tap));
    assert!(is_up(&tap));
    let persist = 0x0800;
    let expected = TAP_FLAGS as u32 | persist;
    assert_eq!(tun_flags(&tap), Some(expected), "tun_flags of {tap}");
    assert_eq!(list_taps(&tap), std::slice::from_ref(&tap));

    create_tap(&tap).unwrap();
    assert!(tap_exists(&tap), "create is idempotent");

    delete_tap(&tap).unwrap();
    assert!(!tap_exists(&tap));
    assert!(!interface_exists(&tap));
    assert!(list_taps(&tap).is_empty());
    delete_tap(&tap).unwrap();
}

#[test]
fn tap_in_use_is_not_deleted() {
    let Some(mut c) = Cleanup::new() else { return };
    let tap = c.tap("busy");
    create_tap(&tap).unwrap();
    let vmm_queue = open_tap_queue(&tap).unwrap();
    let err = delete_tap(&tap).unwrap_err();
    assert!(
        matches!(&err, TapError::Ioctl { op: "TUNSETIFF", source, .. } if source.raw_os_error() == Some(libc::EBUSY)),
        "{err:?}"
    );
    assert!(err.to_string().contains(&tap), "{err}");
    assert!(tap_exists(&tap));
    drop(vmm_queue);
    delete_tap(&tap).unwrap();
    assert!(!tap_exists(&tap));
}

#[test]
fn bridge_attach_detach() {
    let Some(mut c) = Cleanup::new() else { return };
    let br = c.bridge("br");
    let other = c.bridge("br2");
    let tap = c.tap("tb");
    ensure_bridge(&br).unwrap();
    ensure_bridge(&br).unwrap();
    assert!(bridge_exists(&br));
    assert!(is_up(&br));
    assert!(list_taps(&br).is_empty(), "a bridge is not a tap");

    create_tap(&tap).unwrap();
    assert_eq!(bridge_of(&tap), None);
    attach_to_bridge(&tap, &br).unwrap();
    assert_eq!(bridge_of(&tap), Some(br.clone()));
    assert!(sys_net(&br).join("brif").join(&tap).exists());
    attach_to_bridge(&tap, &br).unwrap();

    ensure_bridge(&other).unwrap();
    let err = attach_to_bridge(&tap, &other).unwrap_err();
    assert!(
        matches!(&err, TapError::AttachedElsewhere { bridge, .. } if bridge == &br),
        "{err}"
    );

    detach_from_bridge(&tap, &br).unwrap();
    assert_eq!(bridge_of(&tap), None);
    detach_from_bridge(&tap, &br).unwrap();

    attach_to_bridge(&tap, &other).unwrap();
    delete_tap(&tap).unwrap();
    assert!(!sys_net(&other).join("brif").join(&tap).exists());
    delete_bridge(&br).unwrap();
    assert!(!bridge_exists(&br));
    delete_bridge(&br).unwrap();
}

#[test]
fn missing_interfaces_are_reported() {
    let Some(mut c) = Cleanup::new() else { return };
    let br = c.bridge("nb");
    let tap = c.tap("nt");
    let err = attach_to_bridge(&tap, &br).unwrap_err();
    assert!(matches!(&err, TapError::NotFound(n) if n == &tap), "{err}");
    create_tap(&tap).unwrap();
    let err = attach_to_bridge(&tap, &br).unwrap_err();
    assert!(matches!(&err, TapError::NotFound(n) if n == &br), "{err}");
}

#[test]
fn other_interface_kinds_are_left_alone() {
    if !is_root() {
        return;
    }
    assert!(matches!(create_tap("lo"), Err(TapError::NotTap(_))));
    assert!(matches!(delete_tap("lo"), Err(TapError::NotTap(_))));
    assert!(matches!(ensure_bridge("lo"), Err(TapError::NotBridge(_))));
    assert!(matches!(delete_bridge("lo"), Err(TapError::NotBridge(_))));
    assert!(!tap_exists("lo"));
    assert!(list_taps("lo").is_empty());
    assert!(is_up("lo"));
}

#[test]
fn bad_names_are_rejected() {
    for bad in [
        "",
        ".",
        "..",
        "a/b",
        "a b",
        "a:b",
        "tap%d",
        "sixteen-chars-xx",
    ] {
        assert!(
            matches!(create_tap(bad), Err(TapError::InvalidName(_))),
            "{bad:?}"
        );
        assert!(
            matches!(delete_tap(bad), Err(TapError::InvalidName(_))),
            "{bad:?}"
        );
        assert!(
            matches!(ensure_bridge(bad), Err(TapError::InvalidName(_))),
            "{bad:?}"
        );
        assert!(
            matches!(delete_bridge(bad), Err(TapError::InvalidName(_))),
            "{bad:?}"
        );
        assert!(
            matches!(attach_to_bridge(bad, "br0"), Err(TapError::InvalidName(_))),
            "{bad:?}"
        );
        assert!(
            matches!(attach_to_bridge("tap0", bad), Err(TapError::InvalidName(_))),
            "{bad:?}"
        );
        assert!(!tap_exists(bad));
        assert!(!bridge_exists(bad));
        assert_eq!(bridge_of(bad), None);
    }
}

#[test]
fn ifreq_name_is_nul_terminated() {
    let req = ifreq_for("abcdefghijklmno");
    assert_eq!(req.ifr_name[14], b'o' as libc::c_char);
    assert_eq!(req.ifr_name[15], 0);
    assert_eq!(parse_hex("0x5802\n"), Some(0x5802));
    assert_eq!(parse_hex("zz"), None);
}

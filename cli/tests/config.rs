//! Configuration parsing, precedence, and the one-line error the binary
//! prints for a bad file.

use std::path::{Path, PathBuf};
use std::process::Command;

use ferro_cli::config::{parse_file, resolve, FileConfig, Sources};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferro-cli-cfg-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn file_then_environment_precedence() {
    let path = Path::new("/etc/x/config.toml");
    let f = parse_file(
        path,
        "endpoint = \"10.1.2.3:7400\"\napi_key = \"fk_file\"\n",
    )
    .unwrap();
    let c = resolve(Sources {
        file: Some((path.into(), f)),
        ..Sources::default()
    })
    .unwrap();
    assert_eq!(c.endpoint, "http://10.1.2.3:7400");
    assert_eq!(c.api_key.as_deref(), Some("fk_file"));

    let f = parse_file(
        path,
        "endpoint = \"10.1.2.3:7400\"\napi_key = \"fk_file\"\n",
    )
    .unwrap();
    let c = resolve(Sources {
        file: Some((path.into(), f)),
        env_endpoint: Some("http://env:1".into()),
        env_api_key: Some("fk_env".into()),
        env_ca_file: None,
        flag_endpoint: None,
        flag_api_key: None,
    })
    .unwrap();
    assert_eq!(c.endpoint, "http://env:1");
    assert_eq!(c.api_key.as_deref(), Some("fk_env"));
}

#[test]
fn errors_name_the_file_and_the_field() {
    let path = Path::new("/home/u/.config/ferro/config.toml");
    let e = parse_file(path, "endpoint = \"http://a:1\"\nkey = \"x\"\n").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/home/u/.config/ferro/config.toml: key: "),
        "{e}"
    );
    let e = parse_file(path, "api_key = [1]\n").unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/home/u/.config/ferro/config.toml: api_key: "),
        "{e}"
    );
    let f = FileConfig {
        endpoint: Some("http://nohost".into()),
        api_key: None,
        ca_file: None,
    };
    let e = resolve(Sources {
        file: Some((path.into(), f)),
        ..Sources::default()
    })
    .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/home/u/.config/ferro/config.toml: endpoint: "),
        "{e}"
    );
}

/// Runs the binary with a clean environment and `HOME` in `dir`.
fn ferro(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferro"))
        .args(args)
        .env_clear()
        .env("HOME", dir)
        .envs(env.iter().copied())
        .output()
        .expect("cannot run ferro")
}

#[test]
fn binary_prints_one_error_line_for_a_bad_file() {
    let dir = tmpdir("bad");
    let cfg = dir.join(".config/ferro/config.toml");
    std::fs::create_dir_all(cfg.parent().unwrap()).unwrap();
    std::fs::write(&cfg, "endpoint = \"http://127.0.0.1:1\"\napikey = \"x\"\n").unwrap();
    let out = ferro(&dir, &["instances", "list"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    let want = format!("ferro: error: {}: apikey: ", cfg.display());
    assert!(err.starts_with(&want), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn binary_reports_a_bad_environment_endpoint() {
    let dir = tmpdir("env");
    let out = ferro(&dir, &["hosts", "list"], &[("FERRO_ENDPOINT", "ftp://x:1")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end(),
        "ferro: error: FERRO_ENDPOINT: endpoint: unsupported scheme `ftp` (use http or https)"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn binary_names_an_unreachable_controller_in_one_line() {
    let dir = tmpdir("down");
    // Port 1 on loopback: nothing listens there.
    let out = ferro(&dir, &["azs", "list"], &[("FERRO_ENDPOINT", "127.0.0.1:1")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("ferro: error: cannot reach the controller at http://127.0.0.1:1"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn no_endpoint_and_nothing_listening_fails_at_once_saying_how_to_configure() {
    let dir = tmpdir("noendpoint");
    let t = std::time::Instant::now();
    let out = ferro(&dir, &["instances", "list"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("Connection refused")
            && err.contains("--endpoint")
            && err.contains("FERRO_ENDPOINT"),
        "{err}"
    );
    // It used to retry for 10 s before saying anything.
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
}

#[test]
fn argument_errors_are_one_line_with_status_2() {
    let dir = tmpdir("args");
    for (args, want) in [
        (&["instances", "run", "--image", "x"][..], "--type"),
        (&["instances", "frobnicate"][..], "frobnicate"),
        (
            &["-o", "yaml", "instances", "list"][..],
            "possible values: table, json",
        ),
        (
            &[
                "instances",
                "run",
                "--image",
                "x",
                "--type",
                "f1.nano",
                "--shutdown-behavior",
                "maybe",
            ][..],
            "stop, terminate",
        ),
        (
            &["instances", "list", "--state", "bogus"][..],
            "valid: pending, running",
        ),
    ] {
        let out = ferro(&dir, args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("ferro: error: ") && err.contains(want),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn api_key_flag_beats_the_environment_and_the_file() {
    let f = FileConfig {
        endpoint: Some("http://127.0.0.1:7400".into()),
        api_key: Some("fk_file".into()),
        ..Default::default()
    };
    let cfg = resolve(Sources {
        file: Some(("/x/config.toml".into(), f)),
        env_api_key: Some("fk_env".into()),
        flag_api_key: Some("fk_flag".into()),
        ..Sources::default()
    })
    .unwrap();
    assert_eq!(cfg.api_key.as_deref(), Some("fk_flag"));
    assert!(!cfg.endpoint_is_default);
}

/// `ferro up` starts its own controller: the client options are shown apart
/// in its help and refused with a line saying why.
#[test]
fn up_refuses_the_client_options() {
    let dir = std::env::temp_dir().join(format!("ferro-cli-up-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = ferro(&dir, &["up", "--endpoint", "http://127.0.0.1:9"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("ferro: error: --endpoint is for controller commands")
            && err.lines().count() == 1,
        "{err}"
    );
    let help = ferro(&dir, &["up", "--help"], &[]);
    let text = String::from_utf8_lossy(&help.stdout);
    let (own, client) = text
        .split_once("Controller client options (not for `ferro up`)")
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        own.contains("--listen") && own.contains("--vcpus") && own.contains("--memory"),
        "{text}"
    );
    assert!(
        !own.contains("--endpoint") && client.contains("--endpoint"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

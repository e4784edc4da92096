//! Size-bounded serial console logs.
//!
//! ferro-vmm appends to `console.log` (opened with `O_APPEND`). When it grows
//! past the limit, the agent keeps its last half in `console.log.old` and
//! truncates `console.log`; the VMM's next write lands at the new end of
//! file. Bytes written between the copy and the truncation are lost, a
//! window of microseconds. The tail is read across both files.

use std::path::{Path, PathBuf};

use crate::process::read_tail;

fn old(path: &Path) -> PathBuf {
    path.with_extension("log.old")
}

/// Trim `path` when it is larger than `limit` bytes.
pub fn trim(path: &Path, limit: u64) -> std::io::Result<()> {
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    if len <= limit {
        return Ok(());
    }
    let (keep, _) = read_tail(path, limit / 2)?;
    let tmp = path.with_extension("log.tmp");
    std::fs::write(&tmp, &keep)?;
    std::fs::rename(&tmp, old(path))?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(0)
}

/// The last `max` bytes of the console, and whether older output exists.
pub fn tail(path: &Path, max: u64) -> std::io::Result<(Vec<u8>, bool)> {
    let (cur, cut) = match read_tail(path, max) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), false),
        Err(e) => return Err(e),
    };
    if cut {
        return Ok((cur, true));
    }
    let rest = max - cur.len() as u64;
    match read_tail(&old(path), rest) {
        Ok((mut older, cut)) => {
            older.extend_from_slice(&cur);
            Ok((older, cut))
        }
        Err(_) => Ok((cur, false)),
    }
}

/// The last `n` complete lines of the console, as text.
pub fn last_lines(path: &Path, n: usize) -> String {
    let (bytes, _) = tail(path, 8192).unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn trimmed_log_keeps_its_tail_and_appends_continue() {
        let dir = std::env::temp_dir().join(format!("ferro-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("console.log");
        let mut w = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .unwrap();
        for i in 0..100 {
            writeln!(w, "line {i:03}").unwrap();
        }
        trim(&p, 400).unwrap();
        writeln!(w, "after").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 6);
        let (t, cut) = tail(&p, 1 << 20).unwrap();
        let t = String::from_utf8(t).unwrap();
        assert!(cut || t.len() < 1000);
        assert!(t.ends_with("line 099\nafter\n"), "{t}");
        assert!(!t.contains("line 000"));
        assert_eq!(last_lines(&p, 2), "line 099\nafter");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

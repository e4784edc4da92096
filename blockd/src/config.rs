//! `--volume id=SERIAL,path=FILE,size=SIZE,socket=PATH` specs.

use std::path::PathBuf;

use crate::request::{ID_LEN, SECTOR_SIZE};
use crate::server::VolumeConfig;

/// A bad `--volume` spec, naming the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid --volume `{spec}`: {why}")]
pub struct SpecError {
    /// The offending text.
    pub spec: String,
    /// What is wrong with it.
    pub why: String,
}

/// Parses a size: bytes, or with a `K`, `M`, `G` or `T` suffix (powers of
/// 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 10),
        (i, 'M' | 'm') => (&s[..i], 20),
        (i, 'G' | 'g') => (&s[..i], 30),
        (i, 'T' | 't') => (&s[..i], 40),
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// Parses one `--volume` spec.
pub fn parse_volume(spec: &str) -> Result<VolumeConfig, SpecError> {
    let bad = |why: String| SpecError {
        spec: spec.to_string(),
        why,
    };
    let (mut id, mut path, mut size, mut socket) = (None, None, None, None);
    for kv in spec.split(',') {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| bad(format!("`{kv}` is not key=value")))?;
        match k {
            "id" => id = Some(v.to_string()),
            "path" => path = Some(PathBuf::from(v)),
            "socket" => socket = Some(PathBuf::from(v)),
            "size" => {
                let n = parse_size(v)
                    .filter(|n| *n > 0 && n.is_multiple_of(SECTOR_SIZE))
                    .ok_or_else(|| {
                        bad(format!(
                            "size `{v}` is not a non-zero multiple of 512 bytes"
                        ))
                    })?;
                size = Some(n);
            }
            _ => {
                return Err(bad(format!(
                    "unknown key `{k}` (known: id, path, size, socket)"
                )))
            }
        }
    }
    let id = id
        .filter(|i| !i.is_empty())
        .ok_or_else(|| bad("missing id=".into()))?;
    if id.len() > ID_LEN {
        return Err(bad(format!("id `{id}` is longer than {ID_LEN} bytes")));
    }
    Ok(VolumeConfig {
        id,
        path: path.ok_or_else(|| bad("missing path=".into()))?,
        size: size.ok_or_else(|| bad("missing size=".into()))?,
        socket: socket.ok_or_else(|| bad("missing socket=".into()))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("99999999999T"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("M"), None);
    }

    #[test]
    fn specs_name_the_bad_field() {
        let v = parse_volume("id=vol1,path=/v/1,size=1G,socket=/run/v1.sock").unwrap();
        assert_eq!((v.id.as_str(), v.size), ("vol1", 1 << 30));
        let why = |s: &str| parse_volume(s).unwrap_err().why;
        assert!(why("path=/a,size=1M,socket=/s").contains("missing id"));
        assert!(why("id=a,size=1M,socket=/s").contains("missing path"));
        assert!(why("id=a,path=/a,socket=/s").contains("missing size"));
        assert!(why("id=a,path=/a,size=1M").contains("missing socket"));
        assert!(why("id=a,path=/a,size=1000,socket=/s").contains("size `1000`"));
        assert!(why("id=a,path=/a,size=1M,socket=/s,x=1").contains("unknown key `x`"));
        assert!(
            why("id=abcdefghijklmnopqrstu,path=/a,size=1M,socket=/s").contains("longer than 20")
        );
    }
}

//! `--volume id=SERIAL,path=FILE,size=SIZE,socket=PATH[,backups=…][,epoch=N]`
//! and `--replica id=ID,size=SIZE[,epoch=N]` specs.

use std::path::PathBuf;

use crate::replication::Backup;
use crate::request::{ID_LEN, SECTOR_SIZE};
use crate::server::VolumeConfig;
use crate::store::IoMode;

/// A replica this daemon holds for a primary elsewhere, without a
/// controller (`--replica`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// Volume id (the primary's `id=`).
    pub id: String,
    /// Size in bytes.
    pub size: u64,
    /// The replica set's epoch (the primary's `epoch=`).
    pub epoch: u64,
}

fn parse_epoch(v: &str) -> Option<u64> {
    v.parse().ok().filter(|e| *e > 0)
}

/// `NAME@IP:PORT[+NAME@IP:PORT…]`.
fn parse_backups(v: &str) -> Result<Vec<Backup>, String> {
    let mut out: Vec<Backup> = Vec::new();
    for b in v.split('+') {
        let (id, addr) = b
            .split_once('@')
            .ok_or_else(|| format!("backup `{b}` is not NAME@IP:PORT"))?;
        let addr = addr
            .parse()
            .map_err(|_| format!("backup `{b}`: `{addr}` is not IP:PORT"))?;
        if id.is_empty() || out.iter().any(|o| o.id == id) {
            return Err(format!(
                "backup `{b}`: names must be distinct and not empty"
            ));
        }
        out.push(Backup {
            id: id.to_string(),
            addr,
        });
    }
    Ok(out)
}

/// A `size=` value: bytes (or K/M/G/T), a non-zero multiple of 512.
fn size_value(v: &str) -> Result<u64, String> {
    parse_size(v)
        .filter(|n| *n > 0 && n.is_multiple_of(SECTOR_SIZE))
        .ok_or_else(|| format!("size `{v}` is not a non-zero multiple of 512 bytes"))
}

/// An `epoch=` value: a positive number.
fn epoch_value(v: &str) -> Result<u64, String> {
    parse_epoch(v).ok_or_else(|| format!("epoch `{v}` is not a positive number"))
}

/// Parses one `--replica` spec.
pub fn parse_replica(spec: &str) -> Result<ReplicaConfig, SpecError> {
    let bad = |why: String| SpecError {
        flag: "--replica",
        spec: spec.to_string(),
        why,
    };
    let (mut id, mut size, mut epoch) = (None, None, 1);
    for kv in spec.split(',') {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| bad(format!("`{kv}` is not key=value")))?;
        match k {
            "id" => id = Some(v.to_string()),
            "size" => size = Some(size_value(v).map_err(bad)?),
            "epoch" => epoch = epoch_value(v).map_err(bad)?,
            _ => return Err(bad(format!("unknown key `{k}` (known: id, size, epoch)"))),
        }
    }
    let id = id
        .filter(|i| !i.is_empty() && i.len() <= ID_LEN)
        .ok_or_else(|| bad(format!("id= must be 1 to {ID_LEN} bytes")))?;
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
    {
        return Err(bad(format!("id `{id}` must be of [A-Za-z0-9_-]")));
    }
    Ok(ReplicaConfig {
        id,
        size: size.ok_or_else(|| bad("missing size=".into()))?,
        epoch,
    })
}

/// A bad `--volume` or `--replica` spec, naming the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {flag} `{spec}`: {why}")]
pub struct SpecError {
    /// The flag.
    pub flag: &'static str,
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
        flag: "--volume",
        spec: spec.to_string(),
        why,
    };
    let (mut id, mut path, mut size, mut socket) = (None, None, None, None);
    let (mut backups, mut epoch, mut io) = (Vec::new(), 1, IoMode::Direct);
    for kv in spec.split(',') {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| bad(format!("`{kv}` is not key=value")))?;
        match k {
            "id" => id = Some(v.to_string()),
            "path" => path = Some(PathBuf::from(v)),
            "socket" => socket = Some(PathBuf::from(v)),
            "backups" => backups = parse_backups(v).map_err(bad)?,
            "epoch" => epoch = epoch_value(v).map_err(bad)?,
            "size" => size = Some(size_value(v).map_err(bad)?),
            "io" => {
                io = match v {
                    "direct" => IoMode::Direct,
                    "buffered" => IoMode::Buffered,
                    _ => return Err(bad(format!("io `{v}` is neither direct nor buffered"))),
                }
            }
            _ => {
                return Err(bad(format!(
                    "unknown key `{k}` (known: id, path, size, socket, backups, epoch, io)"
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
        backups,
        epoch,
        io,
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
        assert!(why("id=a,path=/a,size=1M,socket=/s,io=fast").contains("io `fast`"));
        let v = parse_volume("id=a,path=/a,size=1M,socket=/s,io=buffered").unwrap();
        assert_eq!(v.io, IoMode::Buffered);
        assert!(why("id=a,path=/a,socket=/s").contains("missing size"));
        assert!(why("id=a,path=/a,size=1M").contains("missing socket"));
        assert!(why("id=a,path=/a,size=1000,socket=/s").contains("size `1000`"));
        assert!(why("id=a,path=/a,size=1M,socket=/s,x=1").contains("unknown key `x`"));
        assert!(
            why("id=abcdefghijklmnopqrstu,path=/a,size=1M,socket=/s").contains("longer than 20")
        );
        let v = parse_volume(
            "id=v,path=/a,size=1M,socket=/s,backups=b@10.0.0.2:7430+c@10.0.0.3:7430,epoch=3",
        )
        .unwrap();
        assert_eq!(v.backups.len(), 2);
        assert_eq!((v.backups[1].id.as_str(), v.epoch), ("c", 3));
        assert!(why("id=a,path=/a,size=1M,socket=/s,backups=b").contains("not NAME@IP:PORT"));
        assert!(why("id=a,path=/a,size=1M,socket=/s,backups=b@x").contains("not IP:PORT"));
        assert!(
            why("id=a,path=/a,size=1M,socket=/s,backups=b@1.2.3.4:1+b@1.2.3.4:2")
                .contains("distinct")
        );
        assert!(why("id=a,path=/a,size=1M,socket=/s,epoch=0").contains("epoch `0`"));
    }

    #[test]
    fn replica_specs_name_the_bad_field() {
        let r = parse_replica("id=vol0,size=64M,epoch=2").unwrap();
        assert_eq!((r.id.as_str(), r.size, r.epoch), ("vol0", 64 << 20, 2));
        assert_eq!(parse_replica("id=v,size=1M").unwrap().epoch, 1);
        let why = |s: &str| parse_replica(s).unwrap_err().why;
        assert!(why("size=1M").contains("id="));
        assert!(why("id=../x,size=1M").contains("[A-Za-z0-9_-]"));
        assert!(why("id=v").contains("missing size"));
        assert!(why("id=v,size=1M,path=/x").contains("unknown key `path`"));
    }
}

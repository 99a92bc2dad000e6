//! The manifest names the current segment and log. It is the commit point of
//! a checkpoint: written to `MANIFEST.tmp`, fsync'd, renamed over `MANIFEST`,
//! and the directory fsync'd, so a reader sees the old one or the new one.
//!
//! Layout: the 32-byte header (kind `MANI`), a u32 length, that many bytes of
//! JSON ([`Manifest`]), and a CRC-32 of the JSON.

use super::format::{Header, Kind, HEADER_LEN};
use super::sync_dir;
use crate::error::{Error, IoContext, Result};
use serde::{Deserialize, Serialize};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

pub const FILE: &str = "MANIFEST";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub dim: usize,
    pub metric: String,
    pub generation: u64,
    /// File name of the current segment, if any checkpoint has been taken.
    pub segment: Option<String>,
    /// File name of the current write-ahead log.
    pub wal: String,
    /// The next id handed out when the caller gives none.
    pub next_id: u64,
    /// engramdb version that wrote this manifest.
    pub writer: String,
}

pub fn read(dir: &Path) -> Result<Manifest> {
    let path = dir.join(FILE);
    let bytes = std::fs::read(&path).at(&path)?;
    decode(&bytes, &path)
}

/// [`read`] of a manifest already in memory (`path` only names it in errors).
pub fn decode(bytes: &[u8], path: &Path) -> Result<Manifest> {
    Header::decode(bytes, Kind::Manifest, path)?;
    let bad = |d: &str| Error::corruption(path, d.to_string());
    let rest = &bytes[HEADER_LEN..];
    if rest.len() < 8 {
        return Err(bad("truncated"));
    }
    let n = u32::from_le_bytes(rest[0..4].try_into().unwrap()) as usize;
    if rest.len() != 4 + n + 4 {
        return Err(bad("length does not match the file size"));
    }
    let json = &rest[4..4 + n];
    let crc = u32::from_le_bytes(rest[4 + n..].try_into().unwrap());
    if crc != crc32fast::hash(json) {
        return Err(bad("checksum mismatch"));
    }
    let m: Manifest = serde_json::from_slice(json)
        .map_err(|e| Error::corruption(path, format!("bad JSON: {e}")))?;
    // the names are joined to the store's directory and the log is opened
    // for writing: a damaged name must not reach a file outside the store
    let plain = |n: &str, prefix: &str, suffix: &str| {
        n.starts_with(prefix)
            && n.ends_with(suffix)
            && n.len() > prefix.len() + suffix.len()
            && n.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.')
            && !n.contains("..")
    };
    if !plain(&m.wal, "wal-", ".log") {
        return Err(bad("log file name is not of the form wal-N.log"));
    }
    if m.segment
        .as_deref()
        .is_some_and(|s| !plain(s, "seg-", ".dat"))
    {
        return Err(bad("segment file name is not of the form seg-N.dat"));
    }
    Ok(m)
}

pub fn write_atomic(dir: &Path, m: &Manifest) -> Result<()> {
    let tmp = dir.join("MANIFEST.tmp");
    let json = serde_json::to_vec_pretty(m).expect("manifest serialises");
    let mut buf = Vec::with_capacity(HEADER_LEN + json.len() + 8);
    buf.extend_from_slice(&Header::new(Kind::Manifest, m.generation).encode());
    buf.extend_from_slice(&(json.len() as u32).to_le_bytes());
    buf.extend_from_slice(&json);
    buf.extend_from_slice(&crc32fast::hash(&json).to_le_bytes());
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&tmp)
        .at(&tmp)?;
    f.write_all(&buf).at(&tmp)?;
    f.sync_all().at(&tmp)?;
    drop(f);
    crate::fault::crash_point("manifest-tmp-written");
    let dst = dir.join(FILE);
    std::fs::rename(&tmp, &dst).at(&dst)?;
    crate::fault::crash_point("manifest-renamed");
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest {
            dim: 4,
            metric: "cosine".into(),
            generation: 2,
            segment: Some("seg-000002.dat".into()),
            wal: "wal-000002.log".into(),
            next_id: 10,
            writer: "test".into(),
        };
        write_atomic(dir.path(), &m).unwrap();
        assert_eq!(read(dir.path()).unwrap(), m);
        // names that would reach outside the store are refused
        for (wal, seg) in [
            ("../wal-000001.log", None),
            ("/tmp/wal-000001.log", None),
            ("wal-000002.log", Some("sub/seg-000002.dat")),
            ("wal-.log", None),
        ] {
            let bad = Manifest {
                wal: wal.into(),
                segment: seg.map(Into::into),
                ..m.clone()
            };
            write_atomic(dir.path(), &bad).unwrap();
            assert!(
                matches!(read(dir.path()), Err(Error::Corruption { .. })),
                "{wal} {seg:?}"
            );
        }
        write_atomic(dir.path(), &m).unwrap();
        let p = dir.path().join(FILE);
        let good = std::fs::read(&p).unwrap();
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x04;
            std::fs::write(&p, &b).unwrap();
            assert!(read(dir.path()).is_err(), "flip at {i}");
        }
    }
}

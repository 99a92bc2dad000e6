//! The header every engramdb file starts with.
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 4 | magic `b"ENGM"` |
//! | 4 | 4 | kind tag: `b"MANI"`, `b"SEGM"`, `b"WLOG"`, `b"SPMT"`, `b"SPPS"`, `b"SPVC"` |
//! | 8 | 2 | format major version (u16 LE): a reader refuses a newer major |
//! | 10 | 2 | format minor version (u16 LE): additions a same-major reader may ignore |
//! | 12 | 4 | flags (u32 LE, reserved, 0) |
//! | 16 | 8 | generation (u64 LE): which checkpoint the file belongs to |
//! | 24 | 4 | reserved (0) |
//! | 28 | 4 | CRC-32 (IEEE) of bytes 0..28 |
//!
//! All integers and floats in every file are little-endian.

use crate::error::{Error, Result};
use std::path::Path;

pub const MAGIC: [u8; 4] = *b"ENGM";
pub const HEADER_LEN: usize = 32;
pub const FORMAT_MAJOR: u16 = 1;
pub const FORMAT_MINOR: u16 = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Manifest,
    Segment,
    Wal,
    /// SPANN index metadata (heads, posting directory, id map).
    SpannMeta,
    /// SPANN posting pages.
    SpannPostings,
    /// SPANN full-precision vectors for rerank.
    SpannVectors,
}

impl Kind {
    pub fn tag(self) -> [u8; 4] {
        match self {
            Kind::Manifest => *b"MANI",
            Kind::Segment => *b"SEGM",
            Kind::Wal => *b"WLOG",
            Kind::SpannMeta => *b"SPMT",
            Kind::SpannPostings => *b"SPPS",
            Kind::SpannVectors => *b"SPVC",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub major: u16,
    pub minor: u16,
    pub generation: u64,
}

impl Header {
    pub fn new(kind: Kind, generation: u64) -> Self {
        Header {
            kind,
            major: FORMAT_MAJOR,
            minor: FORMAT_MINOR,
            generation,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..8].copy_from_slice(&self.kind.tag());
        b[8..10].copy_from_slice(&self.major.to_le_bytes());
        b[10..12].copy_from_slice(&self.minor.to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.to_le_bytes());
        let crc = crc32fast::hash(&b[0..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parse and check the header at the start of `bytes`, which were read
    /// from `file` and must be of kind `want`.
    pub fn decode(bytes: &[u8], want: Kind, file: &Path) -> Result<Header> {
        if bytes.len() < HEADER_LEN {
            return Err(Error::corruption(
                file,
                format!(
                    "file is {} bytes, shorter than its {HEADER_LEN}-byte header",
                    bytes.len()
                ),
            ));
        }
        let b = &bytes[..HEADER_LEN];
        if b[0..4] != MAGIC {
            return Err(Error::corruption(file, "not an engramdb file (bad magic)"));
        }
        let crc = u32::from_le_bytes(b[28..32].try_into().unwrap());
        if crc != crc32fast::hash(&b[0..28]) {
            return Err(Error::corruption(file, "header checksum mismatch"));
        }
        if b[4..8] != want.tag() {
            return Err(Error::corruption(
                file,
                format!(
                    "expected a {:?} file, found kind tag {:?}",
                    want,
                    String::from_utf8_lossy(&b[4..8])
                ),
            ));
        }
        let major = u16::from_le_bytes(b[8..10].try_into().unwrap());
        let minor = u16::from_le_bytes(b[10..12].try_into().unwrap());
        if major > FORMAT_MAJOR {
            return Err(Error::FormatVersion {
                file: file.to_path_buf(),
                found_major: major,
                found_minor: minor,
                supported_major: FORMAT_MAJOR,
            });
        }
        Ok(Header {
            kind: want,
            major,
            minor,
            generation: u64::from_le_bytes(b[16..24].try_into().unwrap()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_damage() {
        let p = Path::new("x");
        let h = Header::new(Kind::Wal, 9);
        let b = h.encode();
        assert_eq!(Header::decode(&b, Kind::Wal, p).unwrap(), h);
        assert!(matches!(
            Header::decode(&b, Kind::Segment, p),
            Err(Error::Corruption { .. })
        ));
        for i in 0..HEADER_LEN {
            let mut c = b;
            c[i] ^= 0x10;
            assert!(
                Header::decode(&c, Kind::Wal, p).is_err(),
                "flip at byte {i}"
            );
        }
        let mut newer = Header::new(Kind::Wal, 1);
        newer.major = FORMAT_MAJOR + 1;
        assert!(matches!(
            Header::decode(&newer.encode(), Kind::Wal, p),
            Err(Error::FormatVersion { .. })
        ));
    }
}

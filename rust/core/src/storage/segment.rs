//! Segment files: a checkpoint of every live record.
//!
//! | part | layout |
//! |---|---|
//! | header | 32 bytes, kind `SEGM` (see [`super::format`]) |
//! | body | `dim` u32, `metric` u8, `count` u64, `count * dim` f32 vectors, `count` records |
//! | trailer | body length u64, CRC-32 of the body u32, `b"SEGE"` |
//!
//! Records follow the vectors in the same order. The whole body is checked
//! against its CRC before anything in it is used.

use super::codec::{Dec, Enc};
use super::format::{Header, Kind, HEADER_LEN};
use crate::distance::Metric;
use crate::error::{Error, IoContext, Result};
use crate::memory::Record;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

const TRAILER_MAGIC: [u8; 4] = *b"SEGE";
const TRAILER_LEN: usize = 16;

/// The contents of a segment.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub dim: usize,
    pub metric: Metric,
    pub records: Vec<Record>,
    pub vectors: Vec<f32>,
}

/// Write a segment and fsync it. `records[i]` owns `vectors[i*dim..]`.
pub fn write(
    path: &Path,
    generation: u64,
    dim: usize,
    metric: Metric,
    records: &[&Record],
    vectors: &[f32],
) -> Result<u64> {
    let mut body = Enc::with_capacity(13 + vectors.len() * 4 + records.len() * 96);
    body.u32(dim as u32);
    body.u8(metric.code());
    body.u64(records.len() as u64);
    body.f32s(vectors);
    for r in records {
        r.encode(&mut body);
    }
    let body = body.into_inner();
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .at(path)?;
    let mut trailer = [0u8; TRAILER_LEN];
    trailer[0..8].copy_from_slice(&(body.len() as u64).to_le_bytes());
    trailer[8..12].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
    trailer[12..16].copy_from_slice(&TRAILER_MAGIC);
    file.write_all(&Header::new(Kind::Segment, generation).encode())
        .at(path)?;
    file.write_all(&body).at(path)?;
    file.write_all(&trailer).at(path)?;
    file.sync_all().at(path)?;
    Ok((HEADER_LEN + body.len() + TRAILER_LEN) as u64)
}

/// Read and verify a segment.
pub fn read(path: &Path) -> Result<Segment> {
    let bytes = std::fs::read(path).at(path)?;
    decode(&bytes, path)
}

/// [`read`] of a segment already in memory (`path` only names it in errors).
pub fn decode(bytes: &[u8], path: &Path) -> Result<Segment> {
    Header::decode(bytes, Kind::Segment, path)?;
    let bad = |d: String| Error::corruption(path, d);
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        return Err(bad(format!("truncated: {} bytes", bytes.len())));
    }
    let t = &bytes[bytes.len() - TRAILER_LEN..];
    if t[12..16] != TRAILER_MAGIC {
        return Err(bad("missing trailer (file truncated or overwritten)".into()));
    }
    let body_len = u64::from_le_bytes(t[0..8].try_into().unwrap());
    if body_len != (bytes.len() - HEADER_LEN - TRAILER_LEN) as u64 {
        return Err(bad(format!(
            "trailer says the body is {body_len} bytes, file holds {}",
            bytes.len() - HEADER_LEN - TRAILER_LEN
        )));
    }
    let body = &bytes[HEADER_LEN..bytes.len() - TRAILER_LEN];
    if crc32fast::hash(body) != u32::from_le_bytes(t[8..12].try_into().unwrap()) {
        return Err(bad("body checksum mismatch".into()));
    }
    let mut d = Dec::new(body);
    let e = |e: super::codec::DecodeError| Error::corruption(path, e.0);
    let dim = d.u32().map_err(e)? as usize;
    let metric =
        Metric::from_code(d.u8().map_err(e)?).ok_or_else(|| bad("unknown metric code".into()))?;
    let count = d.u64().map_err(e)? as usize;
    if dim == 0 || count.saturating_mul(dim).saturating_mul(4) > d.remaining() {
        return Err(bad(format!(
            "count {count} x dim {dim} does not fit the file"
        )));
    }
    let vectors = d.f32s(count * dim).map_err(e)?;
    let mut records = Vec::with_capacity(count);
    for _ in 0..count {
        records.push(Record::decode(&mut d).map_err(e)?);
    }
    if d.remaining() != 0 {
        return Err(bad(format!(
            "{} unexpected bytes after the records",
            d.remaining()
        )));
    }
    Ok(Segment {
        dim,
        metric,
        records,
        vectors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_flipped_byte_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("seg");
        let recs = [Record::new(5, 1.0), Record::new(6, 2.0)];
        let refs: Vec<&Record> = recs.iter().collect();
        write(&p, 2, 3, Metric::L2, &refs, &[1., 2., 3., 4., 5., 6.]).unwrap();
        let s = read(&p).unwrap();
        assert_eq!(s.records, recs.to_vec());
        assert_eq!(s.vectors, vec![1., 2., 3., 4., 5., 6.]);
        let good = std::fs::read(&p).unwrap();
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x01;
            std::fs::write(&p, &b).unwrap();
            assert!(read(&p).is_err(), "flip at {i} not detected");
        }
        for cut in 0..good.len() {
            std::fs::write(&p, &good[..cut]).unwrap();
            assert!(read(&p).is_err(), "truncation at {cut} not detected");
        }
    }
}

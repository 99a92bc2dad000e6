//! The write-ahead log.
//!
//! After the file header (kind `WLOG`) the log is a sequence of frames:
//!
//! | size | field |
//! |---:|---|
//! | 4 | payload length `n` (u32 LE, 1..=[`MAX_FRAME`]) |
//! | 4 | CRC-32 of the payload |
//! | n | payload: one [`WalOp`] |
//!
//! A write is acknowledged only once its frame is written (and, with `sync`,
//! fsync'd). Replay stops at the first frame that is incomplete or fails its
//! checksum *at the end of the file* (a torn tail, cut off when a writer
//! opens the log); a damaged frame followed by more data is corruption and
//! is reported, never skipped.

use super::codec::{Dec, DecodeError, Enc};
use super::format::{Header, Kind, HEADER_LEN};
use crate::error::{Error, IoContext, Result};
use crate::memory::Record;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Largest payload one frame may carry; bigger batches span several frames.
pub const MAX_FRAME: usize = 64 << 20;

/// An access that reinforces a memory (see the forgetting curve).
#[derive(Debug, Clone, PartialEq)]
pub struct Touch {
    pub id: u64,
    pub last_access: f64,
    pub strength: f32,
    pub access_count: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum WalOp {
    /// Insert or replace records with their (prepared) vectors.
    Put {
        records: Vec<Record>,
        vectors: Vec<f32>,
    },
    /// Replace records' attributes, keeping their vectors.
    Patch {
        records: Vec<Record>,
    },
    Delete {
        ids: Vec<u64>,
    },
    Touch {
        touches: Vec<Touch>,
    },
}

const OP_PUT: u8 = 1;
const OP_PATCH: u8 = 2;
const OP_DELETE: u8 = 3;
const OP_TOUCH: u8 = 4;

impl WalOp {
    pub fn encode(&self, e: &mut Enc) {
        match self {
            WalOp::Put { records, vectors } => {
                e.u8(OP_PUT);
                e.u32(records.len() as u32);
                e.f32s(vectors);
                for r in records {
                    r.encode(e);
                }
            }
            WalOp::Patch { records } => {
                e.u8(OP_PATCH);
                e.u32(records.len() as u32);
                for r in records {
                    r.encode(e);
                }
            }
            WalOp::Delete { ids } => {
                e.u8(OP_DELETE);
                e.u32(ids.len() as u32);
                ids.iter().for_each(|&i| e.u64(i));
            }
            WalOp::Touch { touches } => {
                e.u8(OP_TOUCH);
                e.u32(touches.len() as u32);
                for t in touches {
                    e.u64(t.id);
                    e.f64(t.last_access);
                    e.f32(t.strength);
                    e.u64(t.access_count);
                }
            }
        }
    }

    pub fn decode(d: &mut Dec, dim: usize) -> Result<WalOp, DecodeError> {
        let op = match d.u8()? {
            OP_PUT => {
                let n = d.len_prefix(dim.saturating_mul(4))?;
                let floats = n
                    .checked_mul(dim)
                    .ok_or_else(|| DecodeError("vector count overflow".into()))?;
                let vectors = d.f32s(floats)?;
                let records = (0..n)
                    .map(|_| Record::decode(d))
                    .collect::<Result<_, _>>()?;
                WalOp::Put { records, vectors }
            }
            OP_PATCH => {
                let n = d.len_prefix(8)?;
                WalOp::Patch {
                    records: (0..n)
                        .map(|_| Record::decode(d))
                        .collect::<Result<_, _>>()?,
                }
            }
            OP_DELETE => {
                let n = d.len_prefix(8)?;
                WalOp::Delete {
                    ids: (0..n).map(|_| d.u64()).collect::<Result<_, _>>()?,
                }
            }
            OP_TOUCH => {
                let n = d.len_prefix(28)?;
                let mut touches = Vec::with_capacity(n);
                for _ in 0..n {
                    touches.push(Touch {
                        id: d.u64()?,
                        last_access: d.f64()?,
                        strength: d.f32()?,
                        access_count: d.u64()?,
                    });
                }
                WalOp::Touch { touches }
            }
            t => return Err(DecodeError(format!("unknown operation tag {t}"))),
        };
        if d.remaining() != 0 {
            return Err(DecodeError(format!(
                "{} trailing bytes after operation",
                d.remaining()
            )));
        }
        Ok(op)
    }
}

/// What replaying a log found.
#[derive(Debug)]
pub struct Replay {
    pub ops: Vec<WalOp>,
    /// Bytes up to the end of the last valid frame.
    pub valid_len: u64,
    /// Bytes after it that were ignored as a torn tail (0 if none).
    pub torn_bytes: u64,
    pub generation: u64,
}

/// Read every valid frame of the log at `path`.
pub fn replay(path: &Path, dim: usize) -> Result<Replay> {
    let bytes = std::fs::read(path).at(path)?;
    replay_bytes(&bytes, path, dim)
}

/// [`replay`] of a log already in memory (`path` only names it in errors).
pub fn replay_bytes(bytes: &[u8], path: &Path, dim: usize) -> Result<Replay> {
    let header = Header::decode(bytes, Kind::Wal, path)?;
    let mut pos = HEADER_LEN;
    let mut ops = Vec::new();
    let total = bytes.len();
    while pos < total {
        let rest = &bytes[pos..];
        if rest.len() < 8 {
            break; // not even a frame header: torn tail
        }
        let n = u32::from_le_bytes(rest[0..4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().unwrap());
        if n == 0 || n > MAX_FRAME {
            if rest.iter().all(|&b| b == 0) {
                break; // zero-filled tail left by a crash
            }
            return Err(Error::corruption(
                path,
                format!("frame at offset {pos} has impossible length {n}"),
            ));
        }
        if 8 + n > rest.len() {
            // Frame extends past the end: a torn tail, unless a whole valid
            // frame follows inside it, which a torn append cannot leave (its
            // bytes after this header are this frame's payload prefix) but a
            // damaged length field can: then replaying only up to here would
            // silently drop every later acknowledged write.
            if let Some(at) = next_valid_frame(bytes, pos + 8) {
                return Err(Error::corruption(
                    path,
                    format!(
                        "frame at offset {pos} claims {n} bytes, past the end of the file, \
                         but a valid frame follows at offset {at}"
                    ),
                ));
            }
            break;
        }
        let payload = &rest[8..8 + n];
        if crc32fast::hash(payload) != crc {
            if 8 + n == rest.len() {
                break; // the last frame, partly written
            }
            return Err(Error::corruption(
                path,
                format!(
                    "checksum mismatch in frame at offset {pos}, with {} bytes after it",
                    rest.len() - 8 - n
                ),
            ));
        }
        let op = WalOp::decode(&mut Dec::new(payload), dim)
            .map_err(|e| Error::corruption(path, format!("frame at offset {pos}: {e}")))?;
        ops.push(op);
        pos += 8 + n;
    }
    Ok(Replay {
        ops,
        valid_len: pos as u64,
        torn_bytes: (total - pos) as u64,
        generation: header.generation,
    })
}

/// The offset of the first whole frame at or after `from` whose checksum
/// holds, if any.
fn next_valid_frame(bytes: &[u8], from: usize) -> Option<usize> {
    (from..bytes.len().saturating_sub(8)).find(|&off| {
        let n = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        n > 0
            && n <= MAX_FRAME
            && off + 8 + n <= bytes.len()
            && crc32fast::hash(&bytes[off + 8..off + 8 + n])
                == u32::from_le_bytes(bytes[off + 4..off + 8].try_into().unwrap())
    })
}

/// Appends frames to a log.
#[derive(Debug)]
pub struct WalWriter {
    file: File,
    path: PathBuf,
    len: u64,
    sync: bool,
}

impl WalWriter {
    /// Create a new, empty log (header only) and fsync it.
    pub fn create(path: &Path, generation: u64, sync: bool) -> Result<WalWriter> {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)
            .at(path)?;
        file.write_all(&Header::new(Kind::Wal, generation).encode())
            .at(path)?;
        file.sync_all().at(path)?;
        Ok(WalWriter {
            file,
            path: path.to_path_buf(),
            len: HEADER_LEN as u64,
            sync,
        })
    }

    /// Open an existing log for appending after `valid_len` bytes, cutting
    /// off any torn tail beyond it.
    pub fn open_append(path: &Path, valid_len: u64, sync: bool) -> Result<WalWriter> {
        let mut file = OpenOptions::new().write(true).open(path).at(path)?;
        let actual = file.metadata().at(path)?.len();
        if actual != valid_len {
            file.set_len(valid_len).at(path)?;
            file.sync_all().at(path)?;
        }
        file.seek(SeekFrom::Start(valid_len)).at(path)?;
        Ok(WalWriter {
            file,
            path: path.to_path_buf(),
            len: valid_len,
            sync,
        })
    }

    /// Append operations; returns once they are durable (per `sync`). If a
    /// write fails part-way the log is cut back to where it was, so a failed
    /// append never leaves half a frame behind for the next one to follow.
    pub fn append(&mut self, ops: &[WalOp]) -> Result<()> {
        let mut buf = Vec::new();
        for op in ops {
            let mut e = Enc::default();
            op.encode(&mut e);
            let payload = e.into_inner();
            if payload.len() > MAX_FRAME {
                return Err(Error::InvalidArgument(format!(
                    "one log frame would be {} bytes (limit {MAX_FRAME}); add in smaller batches",
                    payload.len()
                )));
            }
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            buf.extend_from_slice(&payload);
        }
        if crate::fault::armed("wal-append-partial") {
            let _ = self.file.write_all(&buf[..buf.len() / 2]);
            let _ = self.file.sync_data();
            std::process::abort();
        }
        let res = self.file.write_all(&buf).and_then(|_| {
            crate::fault::crash_point("wal-append-unsynced");
            if self.sync {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = res {
            let _ = self.file.set_len(self.len);
            let _ = self.file.seek(SeekFrom::Start(self.len));
            return Err(Error::Io {
                file: self.path.clone(),
                source: e,
            });
        }
        self.len += buf.len() as u64;
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == HEADER_LEN as u64
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops() -> Vec<WalOp> {
        let mut r = Record::new(1, 10.0);
        r.text = Some("a".into());
        vec![
            WalOp::Put {
                records: vec![r.clone(), Record::new(2, 11.0)],
                vectors: vec![1.0, 2.0, 3.0, 4.0],
            },
            WalOp::Delete { ids: vec![2] },
            WalOp::Touch {
                touches: vec![Touch {
                    id: 1,
                    last_access: 12.0,
                    strength: 2.0,
                    access_count: 1,
                }],
            },
            WalOp::Patch { records: vec![r] },
        ]
    }

    #[test]
    fn append_and_replay() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("wal.log");
        let mut w = WalWriter::create(&p, 3, true).unwrap();
        for op in ops() {
            w.append(&[op]).unwrap();
        }
        let r = replay(&p, 2).unwrap();
        assert_eq!(r.ops, ops());
        assert_eq!(r.torn_bytes, 0);
        assert_eq!(r.generation, 3);
    }

    #[test]
    fn every_truncation_replays_a_prefix_and_never_misreads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("wal.log");
        let mut w = WalWriter::create(&p, 1, false).unwrap();
        let mut ends = vec![];
        for op in ops() {
            w.append(&[op]).unwrap();
            ends.push(w.len());
        }
        let full = std::fs::read(&p).unwrap();
        for cut in HEADER_LEN..=full.len() {
            std::fs::write(&p, &full[..cut]).unwrap();
            let r = replay(&p, 2).unwrap();
            let whole = ends.iter().filter(|&&e| e as usize <= cut).count();
            assert_eq!(r.ops, ops()[..whole].to_vec(), "cut at {cut}");
            // a writer cuts the torn tail and appends after it
            let mut w = WalWriter::open_append(&p, r.valid_len, false).unwrap();
            w.append(&[WalOp::Delete { ids: vec![99] }]).unwrap();
            let r2 = replay(&p, 2).unwrap();
            assert_eq!(r2.ops.len(), whole + 1);
        }
    }

    #[test]
    fn a_length_damaged_past_the_end_is_not_a_torn_tail() {
        // a flipped high bit in an early frame's length makes it claim more
        // than the file holds: the later frames must not vanish silently
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("wal.log");
        let mut w = WalWriter::create(&p, 1, false).unwrap();
        for op in ops() {
            w.append(&[op]).unwrap();
        }
        let good = std::fs::read(&p).unwrap();
        for bit in 8..31 {
            let mut b = good.clone();
            b[HEADER_LEN + bit / 8] ^= 1 << (bit % 8);
            std::fs::write(&p, &b).unwrap();
            assert!(
                matches!(replay(&p, 2), Err(Error::Corruption { .. })),
                "length bit {bit}"
            );
        }
    }

    #[test]
    fn damage_in_the_middle_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("wal.log");
        let mut w = WalWriter::create(&p, 1, false).unwrap();
        w.append(&ops()).unwrap();
        let mut b = std::fs::read(&p).unwrap();
        b[HEADER_LEN + 20] ^= 0xff;
        std::fs::write(&p, &b).unwrap();
        assert!(matches!(replay(&p, 2), Err(Error::Corruption { .. })));
    }
}

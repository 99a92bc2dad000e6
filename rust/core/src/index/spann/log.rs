//! The update log of a SPANN index directory: every `add`/`upsert`/`delete`
//! is durable when it returns, not only after [`SpannIndex::flush`].
//!
//! The log reuses the store's write-ahead log format
//! ([`crate::storage::wal`]): a `WLOG` header whose generation field holds
//! the log's sequence number, then CRC-framed [`WalOp`]s. A SPANN log holds
//! only two kinds of operation:
//!
//! - `Put { records, vectors }`: an upsert of prepared (checked, normalised)
//!   vectors; only the records' ids are used. A batch bigger than
//!   [`ROWS_BYTES_PER_FRAME`] spans several frames, written and fsync'd
//!   together.
//! - `Delete { ids }`: tombstones (only ids that were live are logged; a
//!   long list spans frames of [`IDS_PER_FRAME`]).
//!
//! ## Files and ordering
//!
//! `spann.meta` names the log that holds the operations *not* in the saved
//! files: `wal-{log_seq:06}.log`. Flush, compact and save checkpoint like
//! this:
//!
//! 1. write the posting and vector files and fsync them;
//! 2. create the next log, `wal-{log_seq+1}.log`, empty (header only, fsync'd);
//! 3. write `spann.meta.tmp` naming the new log, fsync it, rename it over
//!    `spann.meta` and fsync the directory: the commit point;
//! 4. append to the new log from now on and remove the old one.
//!
//! (A flush whose log is still empty keeps it and skips step 2.)
//!
//! A crash before the rename leaves the old metadata and the old, full log
//! (the unused new log is removed by the next writer); a crash after it
//! leaves the new metadata, whose log is empty, and a stale old log that is
//! never replayed (a writer removes it on open). So replay never applies an
//! operation twice; it would not matter if it did, because a `Put` replaces
//! the id's vector and a `Delete` of an absent id does nothing.
//!
//! Opening replays the log named by the metadata in both modes, in the
//! order written and batch by batch, so the index ends up exactly as the
//! crashed writer left it. A torn tail (a frame cut short by the crash) is
//! ignored and cut off by the next writer; a damaged frame followed by more
//! data is a [`crate::Error::Corruption`] naming the log file. Known limit
//! of the shared frame format: a frame's length field has no checksum of
//! its own, so damage that makes it point past the end of the file reads as
//! a torn tail (the frames after it are dropped, not misread).
//!
//! A reader (opened read-only) replays the log without cutting it; if a
//! writer's checkpoint removes the log between the reader's reading of the
//! metadata and of the log, the reader starts over from the new metadata.
//!
//! fsync policy: as the store's, the log is fsync'd once per call (per
//! batch) by default; with `sync = false` an acknowledged update survives a
//! process crash but not a power loss.

use super::SpannIndex;
use crate::error::{Error, IoContext, Result};
use crate::memory::Record;
use crate::storage::wal::{self, WalOp, MAX_FRAME};
use std::collections::HashSet;
use std::path::Path;

/// Payload bytes of vectors per frame (half the frame limit, leaving room
/// for the ids' records).
pub(crate) const ROWS_BYTES_PER_FRAME: usize = MAX_FRAME / 2;

/// Ids per `Delete` frame (8 bytes each, well inside the frame limit).
pub(crate) const IDS_PER_FRAME: usize = MAX_FRAME / 16;

pub(crate) fn log_name(seq: u64) -> String {
    format!("wal-{seq:06}.log")
}

/// The sequence number of a file named like [`log_name`], if it is one.
pub(crate) fn parse_log_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("wal-")?.strip_suffix(".log")?;
    if digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Sequence numbers of the logs in `dir`.
pub(crate) fn logs_in(dir: &Path) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).at(dir)? {
        let e = e.at(dir)?;
        if let Some(s) = e.file_name().to_str().and_then(parse_log_name) {
            out.push(s);
        }
    }
    Ok(out)
}

/// Remove every log in `dir` other than `keep` (best effort).
pub(crate) fn remove_other_logs(dir: &Path, keep: u64) {
    if let Ok(seqs) = logs_in(dir) {
        for s in seqs.into_iter().filter(|&s| s != keep) {
            let _ = std::fs::remove_file(dir.join(log_name(s)));
        }
    }
}

/// The frames of an upsert of `ids` with prepared `vectors` (`dim` wide).
pub(crate) fn put_ops(ids: &[u64], vectors: &[f32], dim: usize) -> Vec<WalOp> {
    let per = (ROWS_BYTES_PER_FRAME / (dim * 4 + 128)).max(1);
    ids.chunks(per)
        .zip(vectors.chunks(per * dim))
        .map(|(ids, v)| WalOp::Put {
            records: ids.iter().map(|&id| Record::new(id, 0.0)).collect(),
            vectors: v.to_vec(),
        })
        .collect()
}

impl SpannIndex {
    /// Append `ops` to the log (fsync'd per the sync policy) before they
    /// are applied. An index without a directory has no log.
    pub(crate) fn log_ops(&mut self, ops: &[WalOp]) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        match self.log.as_mut() {
            Some(w) if !ops.is_empty() => {
                w.append(ops)?;
                self.log_frames += ops.len() as u64;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Apply the operations of the log at `path` (which must carry sequence
    /// `self.log_seq`); returns what the replay found, or `None` when the
    /// log does not exist (nothing was acknowledged into it).
    pub(crate) fn replay_log(&mut self, path: &Path) -> Result<Option<wal::Replay>> {
        if !path.exists() {
            return Ok(None);
        }
        let mut rep = wal::replay(path, self.dim)?;
        if rep.generation != self.log_seq {
            return Err(Error::corruption(
                path,
                format!(
                    "log carries sequence {} but spann.meta names {}",
                    rep.generation, self.log_seq
                ),
            ));
        }
        let ops = std::mem::take(&mut rep.ops);
        for (i, op) in ops.into_iter().enumerate() {
            match op {
                WalOp::Put { records, vectors } => {
                    let ids: Vec<u64> = records.iter().map(|r| r.id).collect();
                    let mut seen = HashSet::with_capacity(ids.len());
                    if let Some(d) = ids.iter().find(|&&id| !seen.insert(id)) {
                        return Err(Error::corruption(
                            path,
                            format!("frame {i} puts id {d} twice"),
                        ));
                    }
                    self.apply_upsert(&ids, vectors)?;
                }
                WalOp::Delete { ids } => {
                    self.tombstone(&ids);
                }
                other => {
                    return Err(Error::corruption(
                        path,
                        format!(
                            "frame {i} holds a {} operation, which a SPANN log never writes",
                            match other {
                                WalOp::Patch { .. } => "patch",
                                _ => "touch",
                            }
                        ),
                    ))
                }
            }
            self.log_frames += 1;
        }
        Ok(Some(rep))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_log_name(&log_name(7)), Some(7));
        assert_eq!(parse_log_name(&log_name(1234567)), Some(1234567));
        assert_eq!(parse_log_name("wal-12.log"), None);
        assert_eq!(parse_log_name("wal-00000x.log"), None);
        assert_eq!(parse_log_name("spann.meta"), None);
    }

    #[test]
    fn big_batches_span_frames() {
        let dim = 384;
        let per = ROWS_BYTES_PER_FRAME / (dim * 4 + 128);
        let n = per * 2 + 3;
        let ids: Vec<u64> = (0..n as u64).collect();
        let v = vec![0.5f32; n * dim];
        let ops = put_ops(&ids, &v, dim);
        assert_eq!(ops.len(), 3);
        let mut got = 0;
        for op in &ops {
            let WalOp::Put { records, vectors } = op else {
                panic!()
            };
            assert_eq!(vectors.len(), records.len() * dim);
            let mut e = crate::storage::codec::Enc::default();
            op.encode(&mut e);
            assert!(e.into_inner().len() <= MAX_FRAME);
            got += records.len();
        }
        assert_eq!(got, n);
    }
}

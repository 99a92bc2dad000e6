//! Crash points for fault-injection tests: always compiled in, off unless
//! the environment variable `ENGRAMDB_CRASH_AT` names a point, in which
//! case the process aborts there (no destructors, no flushing: like
//! `kill -9` at that instant). Points:
//!
//! | point | where |
//! |---|---|
//! | `wal-append-partial` | half of a log append is written (and synced), the rest never is |
//! | `wal-append-unsynced` | a log append is written but not yet fsync'd |
//! | `checkpoint-segment-written` | the new segment is on disk, nothing else |
//! | `checkpoint-wal-created` | the new segment and the new empty log exist, the manifest is old |
//! | `manifest-tmp-written` | `MANIFEST.tmp` is written and fsync'd, not yet renamed |
//! | `manifest-renamed` | the new manifest is renamed into place, the directory not yet fsync'd |
//! | `checkpoint-committed` | the new manifest is durable, the old files not yet removed |
//!
//! The variable is read once per process.

use std::sync::OnceLock;

fn armed_point() -> Option<&'static str> {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    AT.get_or_init(|| std::env::var("ENGRAMDB_CRASH_AT").ok())
        .as_deref()
}

/// Whether `ENGRAMDB_CRASH_AT` names `point`.
pub fn armed(point: &str) -> bool {
    armed_point() == Some(point)
}

/// Abort the process here if `ENGRAMDB_CRASH_AT` names `point`.
#[inline]
pub fn crash_point(point: &str) {
    if armed(point) {
        std::process::abort();
    }
}

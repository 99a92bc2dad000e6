//! Bytes on disk. Every file starts with the 32-byte header of [`format`];
//! the store directory holds:
//!
//! | file | module | role |
//! |---|---|---|
//! | `MANIFEST` | [`manifest`] | which segment and log are current; replaced atomically |
//! | `seg-NNNNNN.dat` | [`segment`] | a checkpoint of every live record and vector |
//! | `wal-NNNNNN.log` | [`wal`] | operations since that checkpoint, one CRC'd frame each |
//! | `LOCK` | [`lock`] | held by the one writer process |

pub mod codec;
pub mod format;
pub mod lock;
pub mod manifest;
pub mod posting;
pub mod segment;
pub mod wal;

use crate::error::{IoContext, Result};
use std::fs::File;
use std::path::Path;

/// fsync a directory so a rename or a new file in it survives power loss.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).at(dir)
}

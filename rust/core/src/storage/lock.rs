//! One writer per store: an exclusive advisory lock (flock) on `LOCK`, held
//! for the writer's lifetime and released by the OS if the process dies.

use crate::error::{Error, IoContext, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;

#[derive(Debug)]
pub struct WriterLock {
    _file: File,
}

impl WriterLock {
    pub fn acquire(dir: &Path) -> Result<WriterLock> {
        let path = dir.join("LOCK");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .at(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(WriterLock { _file: file }),
            Err(TryLockError::WouldBlock) => Err(Error::Locked(dir.to_path_buf())),
            Err(TryLockError::Error(e)) => Err(Error::Io {
                file: path,
                source: e,
            }),
        }
    }
}

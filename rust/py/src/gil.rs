//! The helpers every long core call goes through: they release the GIL, run
//! the work on engramdb's rayon pool, and map errors to Python.
//!
//! Lock order matters: a handle's lock is taken on the calling thread
//! *before* entering the pool ([`with_read`], [`with_write`]). Taken inside
//! the pool, a worker holding a write lock could, while it waits for its own
//! parallel sub-tasks, steal another call's job that blocks on the same lock,
//! and both would wait forever.

use engramdb_core::Error;
use pyo3::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::sync::{Arc, RwLock};

static POOL: RwLock<Option<Arc<ThreadPool>>> = RwLock::new(None);

fn pool() -> Arc<ThreadPool> {
    if let Some(p) = POOL.read().unwrap().as_ref() {
        return p.clone();
    }
    let mut w = POOL.write().unwrap();
    w.get_or_insert_with(|| Arc::new(ThreadPoolBuilder::new().build().expect("thread pool")))
        .clone()
}

/// Run `f` without the GIL on the engramdb thread pool.
pub fn run<T: Send>(py: Python<'_>, f: impl FnOnce() -> Result<T, Error> + Send) -> PyResult<T> {
    let p = pool();
    py.detach(|| p.install(f))
        .map_err(|e| crate::error::to_py(py, e))
}

/// Run `f` on the state behind `lock` (shared access) without the GIL.
pub fn with_read<S: Send + Sync, T: Send>(
    py: Python<'_>,
    lock: &RwLock<Option<S>>,
    f: impl FnOnce(&S) -> Result<T, Error> + Send,
) -> PyResult<T> {
    let p = pool();
    with_read_inline(py, lock, move |state| p.install(|| f(state)))
}

/// [`with_read`] on the calling thread instead of the pool, for work too
/// small to parallelise (one SPANN query: its scan is sequential). Handing a
/// job to a pool thread and waiting for it costs tens of microseconds (two
/// thread wake-ups): measured ~80 us per call on a 2-core VM, as much as a
/// whole query. `f` must not start parallel work of its own (it would run
/// on rayon's global pool, not engramdb's).
pub fn with_read_inline<S: Send + Sync, T: Send>(
    py: Python<'_>,
    lock: &RwLock<Option<S>>,
    f: impl FnOnce(&S) -> Result<T, Error> + Send,
) -> PyResult<T> {
    py.detach(|| {
        let guard = lock.read().unwrap_or_else(|e| e.into_inner());
        let state = guard.as_ref().ok_or(Error::Closed)?;
        f(state)
    })
    .map_err(|e| crate::error::to_py(py, e))
}

/// Run `f` on the state behind `lock` (exclusive access) without the GIL.
pub fn with_write<S: Send + Sync, T: Send>(
    py: Python<'_>,
    lock: &RwLock<Option<S>>,
    f: impl FnOnce(&mut S) -> Result<T, Error> + Send,
) -> PyResult<T> {
    let p = pool();
    py.detach(|| {
        let mut guard = lock.write().unwrap_or_else(|e| e.into_inner());
        let state = guard.as_mut().ok_or(Error::Closed)?;
        p.install(|| f(state))
    })
    .map_err(|e| crate::error::to_py(py, e))
}

/// Set how many threads searches and builds use (default: all cores).
#[pyfunction]
pub fn set_num_threads(n: usize) -> PyResult<()> {
    if n == 0 {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "n must be at least 1",
        ));
    }
    let p = ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.to_string()))?;
    *POOL.write().unwrap() = Some(Arc::new(p));
    Ok(())
}

/// How many threads searches and builds use.
#[pyfunction]
pub fn get_num_threads() -> usize {
    pool().current_num_threads()
}

//! `NativeSpann`: the binding of `engramdb_core::index::spann::SpannIndex`.
//! Arrays arrive as C-contiguous float32 / uint64 (the Python layer,
//! `engramdb/spann.py`, converts once) and results leave as new flat arrays
//! that Python reshapes. Every long call releases the GIL through
//! [`crate::gil::run`].

use crate::gil::run;
use crate::hits::{self, SearchResult};
use engramdb_core::index::spann::{Mode, OpenOptions, SearchParams, SpannIndex, SpannParams};
use engramdb_core::{Error, Metric};
use numpy::{PyArray1, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::RwLock;

#[pyclass(module = "engramdb._native", frozen)]
pub struct NativeSpann {
    inner: RwLock<Option<SpannIndex>>,
}

fn closed() -> Error {
    Error::Closed
}

fn params_from(d: Option<&Bound<'_, PyDict>>) -> PyResult<SpannParams> {
    let mut p = SpannParams::default();
    let Some(d) = d else { return Ok(p) };
    for (k, v) in d.iter() {
        let key: String = k.extract()?;
        match key.as_str() {
            "head_ratio" => p.head_ratio = v.extract()?,
            "replicas" => p.replicas = v.extract()?,
            "assign_candidates" => p.assign_candidates = v.extract()?,
            "rng_factor" => p.rng_factor = v.extract()?,
            "posting_cap" => p.posting_cap = v.extract()?,
            "merge_below" => p.merge_below = v.extract()?,
            "branch" => p.branch = v.extract()?,
            "kmeans_iters" => p.kmeans_iters = v.extract()?,
            "sample_per_centroid" => p.sample_per_centroid = v.extract()?,
            "balance" => p.balance = v.extract()?,
            "coarse_leaf" => p.coarse_leaf = v.extract()?,
            "build_coarse_probe" => p.build_coarse_probe = v.extract()?,
            "seed" => p.seed = v.extract()?,
            "nprobe" => p.search.nprobe = v.extract()?,
            "epsilon" => p.search.epsilon = v.extract()?,
            "coarse_probe" => p.search.coarse_probe = v.extract()?,
            "rerank" => p.search.rerank = v.extract()?,
            other => {
                return Err(crate::error::to_py(
                    d.py(),
                    Error::InvalidArgument(format!("unknown SPANN parameter {other:?}")),
                ))
            }
        }
    }
    Ok(p)
}

/// The build parameters and the search a query gets by default (scaled to
/// the index's size, see `SpannIndex::search_defaults`).
fn params_dict<'py>(
    py: Python<'py>,
    p: &SpannParams,
    search: &SearchParams,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("head_ratio", p.head_ratio)?;
    d.set_item("replicas", p.replicas)?;
    d.set_item("assign_candidates", p.assign_candidates)?;
    d.set_item("rng_factor", p.rng_factor)?;
    d.set_item("posting_cap", p.posting_cap)?;
    d.set_item("merge_below", p.merge_below)?;
    d.set_item("branch", p.branch)?;
    d.set_item("kmeans_iters", p.kmeans_iters)?;
    d.set_item("sample_per_centroid", p.sample_per_centroid)?;
    d.set_item("balance", p.balance)?;
    d.set_item("coarse_leaf", p.coarse_leaf)?;
    d.set_item("build_coarse_probe", p.build_coarse_probe)?;
    d.set_item("seed", p.seed)?;
    d.set_item("nprobe", search.nprobe)?;
    d.set_item("epsilon", search.epsilon)?;
    d.set_item("coarse_probe", search.coarse_probe)?;
    d.set_item("rerank", search.rerank)?;
    Ok(d)
}

impl NativeSpann {
    fn read<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&SpannIndex) -> Result<T, Error> + Send,
    ) -> PyResult<T> {
        crate::gil::with_read(py, &self.inner, f)
    }

    /// [`Self::read`] on this thread, for calls with no parallel work.
    fn read_inline<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&SpannIndex) -> Result<T, Error> + Send,
    ) -> PyResult<T> {
        crate::gil::with_read_inline(py, &self.inner, f)
    }

    fn write<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut SpannIndex) -> Result<T, Error> + Send,
    ) -> PyResult<T> {
        crate::gil::with_write(py, &self.inner, f)
    }
}

#[pymethods]
impl NativeSpann {
    /// Build an index over `vectors` (n x dim float32), save it to `path`
    /// and return it opened in `mode` as the directory's writer.
    /// `progress(stage, done, total)` is called from worker threads about a
    /// hundred times per stage. `sync`: fsync the update log on every
    /// add/delete.
    #[staticmethod]
    #[pyo3(signature = (vectors, path, metric="cosine", ids=None, params=None, progress=None, mode="disk", sync=true))]
    #[allow(clippy::too_many_arguments)]
    fn build<'py>(
        py: Python<'py>,
        vectors: PyReadonlyArray2<'py, f32>,
        path: PathBuf,
        metric: &str,
        ids: Option<PyReadonlyArray1<'py, u64>>,
        params: Option<&Bound<'py, PyDict>>,
        progress: Option<Py<PyAny>>,
        mode: &str,
        sync: bool,
    ) -> PyResult<NativeSpann> {
        let metric = Metric::parse(metric).map_err(|e| crate::error::to_py(py, e))?;
        let mode = Mode::parse(mode).map_err(|e| crate::error::to_py(py, e))?;
        let params = params_from(params)?;
        let dim = vectors.shape()[1];
        let data = vectors.as_slice()?;
        let ids: Option<Vec<u64>> = ids.map(|a| a.as_slice().map(|s| s.to_vec())).transpose()?;
        let last = AtomicUsize::new(usize::MAX);
        let report = |stage: &str, done: usize, total: usize| {
            let Some(cb) = progress.as_ref() else { return };
            let pct = (done * 100).checked_div(total).unwrap_or(100);
            let key = (stage.len() << 8) | pct;
            if last.swap(key, Ordering::Relaxed) == key {
                return;
            }
            Python::attach(|py| {
                if let Err(e) = cb.call1(py, (stage, done, total)) {
                    e.print(py);
                }
            });
        };
        let idx = run(py, || {
            let mut idx =
                SpannIndex::build(data, dim, ids.as_deref(), metric, params, Some(&report))?;
            let full = idx.mode() == Mode::Memory && mode == Mode::Memory;
            idx.set_sync(sync);
            idx.save(&path)?;
            if full {
                Ok(idx)
            } else {
                drop(idx); // releases the lock the reopened handle takes
                SpannIndex::open_with(&path, OpenOptions::new(mode).sync(sync))
            }
        })?;
        Ok(NativeSpann {
            inner: RwLock::new(Some(idx)),
        })
    }

    /// Open a saved index; `mode` is "disk" or "memory". The update log is
    /// replayed. A writer takes the directory's lock (a second one gets
    /// StoreLockedError); `read_only=True` opens without it.
    #[staticmethod]
    #[pyo3(signature = (path, mode="disk", read_only=false, sync=true))]
    fn open(
        py: Python<'_>,
        path: PathBuf,
        mode: &str,
        read_only: bool,
        sync: bool,
    ) -> PyResult<NativeSpann> {
        let mode = Mode::parse(mode).map_err(|e| crate::error::to_py(py, e))?;
        let opts = OpenOptions::new(mode).read_only(read_only).sync(sync);
        let idx = run(py, || SpannIndex::open_with(&path, opts))?;
        Ok(NativeSpann {
            inner: RwLock::new(Some(idx)),
        })
    }

    #[getter]
    fn dim(&self) -> PyResult<usize> {
        Ok(self
            .inner
            .read()
            .unwrap()
            .as_ref()
            .ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("index is closed"))?
            .dim())
    }

    #[getter]
    fn metric(&self) -> PyResult<&'static str> {
        Ok(self
            .inner
            .read()
            .unwrap()
            .as_ref()
            .ok_or_else(|| pyo3::exceptions::PyRuntimeError::new_err("index is closed"))?
            .metric()
            .name())
    }

    fn __len__(&self) -> usize {
        self.inner.read().unwrap().as_ref().map_or(0, |i| i.len())
    }

    /// Ids of the live vectors (in row order).
    fn ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let ids = self.read_inline(py, |s| Ok(s.ids()))?;
        Ok(PyArray1::from_vec(py, ids))
    }

    fn params<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let g = self.inner.read().unwrap();
        let i = g
            .as_ref()
            .ok_or_else(|| crate::error::to_py(py, closed()))?;
        params_dict(py, i.params(), &i.search_defaults())
    }

    /// Search `queries` (m x d). Returns flat (ids, scores) of m * k';
    /// k' = min(k, live vectors); empty slots hold id 2**64-1, score NaN.
    #[pyo3(signature = (queries, k=10, nprobe=None, epsilon=None, coarse_probe=None, rerank=None))]
    #[allow(clippy::too_many_arguments)]
    fn search<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        k: usize,
        nprobe: Option<usize>,
        epsilon: Option<f32>,
        coarse_probe: Option<usize>,
        rerank: Option<usize>,
    ) -> PyResult<SearchResult<'py>> {
        let d = queries.shape()[1];
        let one = queries.shape()[0] == 1;
        let data = queries.as_slice()?;
        let work = move |s: &SpannIndex| {
            if d != s.dim() {
                return Err(Error::DimensionMismatch {
                    expected: s.dim(),
                    got: d,
                });
            }
            if k == 0 {
                return Err(Error::InvalidArgument("k must be at least 1".into()));
            }
            let dp = s.search_defaults();
            let sp = SearchParams {
                nprobe: nprobe.unwrap_or(dp.nprobe),
                epsilon: epsilon.unwrap_or(dp.epsilon),
                coarse_probe: coarse_probe.unwrap_or(dp.coarse_probe),
                rerank: rerank.unwrap_or(dp.rerank),
                filter: dp.filter,
            };
            let hits = s.search(data, k, &sp, None)?;
            let kk = k.min(s.len()).max(1);
            let (ids, scores) = hits::pack(&hits, kk, |x| s.metric().user_score(x));
            Ok((ids, scores, kk))
        };
        // one query runs on this thread (its scan is sequential; a trip
        // through the pool would cost as much as the query), a batch on the
        // pool, one query per task
        let (ids, scores, kk) = if one {
            self.read_inline(py, work)?
        } else {
            self.read(py, work)?
        };
        Ok((
            PyArray1::from_vec(py, ids),
            PyArray1::from_vec(py, scores),
            kk,
        ))
    }

    /// Insert vectors under new ids (`upsert=True` replaces existing ones);
    /// in the update log (fsync'd per `sync`) when it returns.
    #[pyo3(signature = (vectors, ids, upsert=false))]
    fn add<'py>(
        &self,
        py: Python<'py>,
        vectors: PyReadonlyArray2<'py, f32>,
        ids: PyReadonlyArray1<'py, u64>,
        upsert: bool,
    ) -> PyResult<()> {
        let d = vectors.shape()[1];
        let data = vectors.as_slice()?;
        let ids = ids.as_slice()?;
        self.write(py, move |s| {
            if d != s.dim() {
                return Err(Error::DimensionMismatch {
                    expected: s.dim(),
                    got: d,
                });
            }
            if upsert {
                s.upsert(ids, data)
            } else {
                s.add(ids, data)
            }
        })
    }

    /// Tombstone ids; returns how many were present. In the update log
    /// when it returns.
    fn delete<'py>(&self, py: Python<'py>, ids: PyReadonlyArray1<'py, u64>) -> PyResult<usize> {
        let ids = ids.as_slice()?;
        self.write(py, move |s| s.delete(ids))
    }

    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        self.write(py, |s| s.flush())
    }

    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        self.write(py, move |s| s.save(&path))
    }

    fn compact<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = self.write(py, |s| s.compact())?;
        let d = PyDict::new(py);
        d.set_item("disk_before", r.disk_before)?;
        d.set_item("disk_after", r.disk_after)?;
        d.set_item("entries_dropped", r.entries_dropped)?;
        d.set_item("merged", r.merged)?;
        d.set_item("split", r.split)?;
        d.set_item("rows_dropped", r.rows_dropped)?;
        Ok(d)
    }

    fn verify<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let r = self.read(py, |s| s.verify())?;
        let d = PyDict::new(py);
        d.set_item("postings", r.postings)?;
        d.set_item("entries", r.entries)?;
        d.set_item("pages", r.pages)?;
        d.set_item("vectors", r.vectors)?;
        Ok(d)
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.read_inline(py, |s| Ok(s.stats()))?;
        let d = PyDict::new(py);
        d.set_item("dim", s.dim)?;
        d.set_item("metric", s.metric.name())?;
        d.set_item(
            "mode",
            match s.mode {
                Mode::Memory => "memory",
                Mode::Disk => "disk",
            },
        )?;
        d.set_item("live", s.live)?;
        d.set_item("rows", s.rows)?;
        d.set_item("heads", s.heads)?;
        d.set_item("postings", s.postings)?;
        d.set_item("entries", s.entries)?;
        d.set_item("replicas", s.replicas)?;
        d.set_item("ram_bytes", s.ram_bytes)?;
        d.set_item("disk_bytes", s.disk_bytes)?;
        d.set_item("log_bytes", s.log_bytes)?;
        d.set_item("garbage_bytes", s.garbage_bytes)?;
        d.set_item("last_queries", s.last_queries)?;
        d.set_item("last_postings_read", s.last_postings_read)?;
        d.set_item("last_bytes_read", s.last_bytes_read)?;
        Ok(d)
    }

    /// Read postings and vectors with O_DIRECT (bypassing the page cache)
    /// where the file system allows it; returns whether it does.
    fn set_direct_io(&self, py: Python<'_>, on: bool) -> PyResult<bool> {
        self.write(py, move |s| Ok(s.set_direct_io(on)))
    }

    fn close(&self) {
        *self.inner.write().unwrap() = None;
    }
}

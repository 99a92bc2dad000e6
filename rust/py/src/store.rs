//! `NativeStore`: the binding of `engramdb_core::Store`. Arrays arrive as
//! C-contiguous float32 (the Python layer converts once) and are borrowed as
//! slices; results leave as new numpy arrays.

use crate::gil::{run, with_read, with_write};
use crate::hits::{self, SearchResult};
use engramdb_core::memory::Weights;
use engramdb_core::memory::{Filter, Link, Record, Scope};
use engramdb_core::storage::wal::Touch;
use engramdb_core::store::{self, AddOptions, Insert, RecallOptions, SearchOptions, WriteMode};
use engramdb_core::{Error, Metric, Store, StoreOptions};
use numpy::{PyArray1, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use std::sync::RwLock;

#[pyclass(module = "engramdb._native", frozen)]
pub struct NativeStore {
    inner: RwLock<Option<Store>>,
}

fn parse_json(s: Option<String>, what: &str) -> Result<Option<serde_json::Value>, Error> {
    s.map(|s| {
        serde_json::from_str(&s)
            .map_err(|e| Error::InvalidArgument(format!("{what} is not valid JSON: {e}")))
    })
    .transpose()
}

fn column<T: Clone>(v: &Option<Vec<T>>, n: usize, name: &str) -> Result<(), Error> {
    match v {
        Some(v) if v.len() != n => Err(Error::InvalidArgument(format!(
            "{name} has {} entries for {n} vectors",
            v.len()
        ))),
        _ => Ok(()),
    }
}

fn record_dict<'py>(py: Python<'py>, r: &Record) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("id", r.id)?;
    d.set_item("text", r.text.as_deref())?;
    d.set_item("metadata", r.metadata.as_ref().map(|m| m.to_string()))?;
    d.set_item("user_id", r.scope.user_id.as_deref())?;
    d.set_item("agent_id", r.scope.agent_id.as_deref())?;
    d.set_item("session_id", r.scope.session_id.as_deref())?;
    d.set_item("importance", r.importance)?;
    d.set_item("strength", r.strength)?;
    d.set_item("created_at", r.created_at)?;
    d.set_item("updated_at", r.updated_at)?;
    d.set_item("last_access", r.last_access)?;
    d.set_item("access_count", r.access_count)?;
    d.set_item("archived", r.archived)?;
    let links = PyList::empty(py);
    for l in &r.links {
        links.append((l.target, l.kind.as_str(), l.weight))?;
    }
    d.set_item("links", links)?;
    Ok(d)
}

impl NativeStore {
    fn read<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Store) -> Result<T, Error> + Send,
    ) -> PyResult<T> {
        with_read(py, &self.inner, f)
    }

    /// [`Self::read`] on this thread: for lookups with no parallel work,
    /// where a trip through the pool would cost more than the call.
    fn read_inline<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Store) -> Result<T, Error> + Send,
    ) -> PyResult<T> {
        crate::gil::with_read_inline(py, &self.inner, f)
    }

    fn write<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Store) -> Result<T, Error> + Send,
    ) -> PyResult<T> {
        with_write(py, &self.inner, f)
    }
}

#[pymethods]
impl NativeStore {
    #[new]
    #[pyo3(signature = (path, dim=None, metric=None, read_only=false, sync=true, checkpoint_bytes=None, ann_threshold=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: std::path::PathBuf,
        dim: Option<usize>,
        metric: Option<String>,
        read_only: bool,
        sync: bool,
        checkpoint_bytes: Option<u64>,
        ann_threshold: Option<usize>,
    ) -> PyResult<Self> {
        let store = run(py, || {
            let metric = metric.as_deref().map(Metric::parse).transpose()?;
            let mut opts = StoreOptions {
                dim,
                metric,
                read_only,
                sync,
                ..Default::default()
            };
            if let Some(c) = checkpoint_bytes {
                opts.checkpoint_bytes = c;
            }
            if let Some(t) = ann_threshold {
                opts.ann_threshold = t;
            }
            Store::open(&path, opts)
        })?;
        Ok(NativeStore {
            inner: RwLock::new(Some(store)),
        })
    }

    #[getter]
    fn dim(&self, py: Python<'_>) -> PyResult<usize> {
        self.read_inline(py, |s| Ok(s.dim()))
    }

    #[getter]
    fn metric(&self, py: Python<'_>) -> PyResult<&'static str> {
        self.read_inline(py, |s| Ok(s.metric().name()))
    }

    #[getter]
    fn read_only(&self, py: Python<'_>) -> PyResult<bool> {
        self.read_inline(py, |s| Ok(s.read_only()))
    }

    #[getter]
    fn closed(&self) -> bool {
        self.inner.read().unwrap().is_none()
    }

    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        self.read_inline(py, |s| Ok(s.len()))
    }

    fn __contains__(&self, py: Python<'_>, id: u64) -> PyResult<bool> {
        self.read_inline(py, |s| Ok(s.contains(id)))
    }

    /// Insert (or with `upsert`, replace) a batch. Column arguments are
    /// per-vector lists; `metadata` entries are JSON object strings.
    #[pyo3(signature = (vectors, ids=None, texts=None, metadata=None, user_ids=None, agent_ids=None, session_ids=None, importance=None, created_at=None, upsert=false, now=None, auto_link=false, link_k=5, link_threshold=0.75, dedupe=None))]
    #[allow(clippy::too_many_arguments)]
    fn add<'py>(
        &self,
        py: Python<'py>,
        vectors: PyReadonlyArray2<'py, f32>,
        ids: Option<PyReadonlyArray1<'py, u64>>,
        texts: Option<Vec<Option<String>>>,
        metadata: Option<Vec<Option<String>>>,
        user_ids: Option<Vec<Option<String>>>,
        agent_ids: Option<Vec<Option<String>>>,
        session_ids: Option<Vec<Option<String>>>,
        importance: Option<Vec<f32>>,
        created_at: Option<Vec<f64>>,
        upsert: bool,
        now: Option<f64>,
        auto_link: bool,
        link_k: usize,
        link_threshold: f32,
        dedupe: Option<f32>,
    ) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let shape = vectors.shape();
        let (n, d) = (shape[0], shape[1]);
        let data = vectors.as_slice()?;
        let ids: Option<Vec<u64>> = ids.map(|a| a.as_slice().map(|s| s.to_vec())).transpose()?;
        let out = self.write(py, move |s| {
            if n > 0 && d != s.dim() {
                return Err(Error::DimensionMismatch {
                    expected: s.dim(),
                    got: d,
                });
            }
            column(&ids, n, "ids")?;
            column(&texts, n, "texts")?;
            column(&metadata, n, "metadata")?;
            column(&user_ids, n, "user_ids")?;
            column(&agent_ids, n, "agent_ids")?;
            column(&session_ids, n, "session_ids")?;
            column(&importance, n, "importance")?;
            column(&created_at, n, "created_at")?;
            let at =
                |v: &Option<Vec<Option<String>>>, i: usize| v.as_ref().and_then(|v| v[i].clone());
            let mut items = Vec::with_capacity(n);
            for i in 0..n {
                items.push(Insert {
                    id: ids.as_ref().map(|v| v[i]),
                    text: at(&texts, i),
                    metadata: parse_json(at(&metadata, i), "metadata")?,
                    scope: Scope {
                        user_id: at(&user_ids, i),
                        agent_id: at(&agent_ids, i),
                        session_id: at(&session_ids, i),
                    },
                    importance: importance.as_ref().map(|v| v[i]),
                    created_at: created_at.as_ref().map(|v| v[i]),
                });
            }
            let opts = AddOptions {
                mode: if upsert {
                    WriteMode::Upsert
                } else {
                    WriteMode::Add
                },
                auto_link,
                link_k,
                link_threshold,
                dedupe,
            };
            s.add_with(data, items, &opts, now.unwrap_or_else(store::now_seconds))
        })?;
        Ok(PyArray1::from_vec(py, out))
    }

    /// Exact search. Returns (ids, scores) of shape (m, k); slots past the
    /// matching records hold id 2**64-1 and score NaN.
    #[pyo3(signature = (queries, k=10, filter=None, user_id=None, agent_id=None, session_id=None, include_archived=false, exact=false))]
    #[allow(clippy::too_many_arguments)]
    fn search<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        k: usize,
        filter: Option<String>,
        user_id: Option<String>,
        agent_id: Option<String>,
        session_id: Option<String>,
        include_archived: bool,
        exact: bool,
    ) -> PyResult<SearchResult<'py>> {
        let shape = queries.shape();
        let (m, d) = (shape[0], shape[1]);
        let data = queries.as_slice()?;
        let (ids, scores, kk) = self.read(py, move |s| {
            if d != s.dim() {
                return Err(Error::DimensionMismatch {
                    expected: s.dim(),
                    got: d,
                });
            }
            let mut opts = search_options(filter, user_id, agent_id, session_id, include_archived)?;
            opts.exact = exact;
            let hits = s.search(data, m, k, &opts)?;
            let kk = k.min(s.len()).max(1);
            let (ids, scores) = hits::pack(&hits, kk, |x| s.metric().user_score(x));
            Ok((ids, scores, kk))
        })?;
        Ok((
            PyArray1::from_vec(py, ids),
            PyArray1::from_vec(py, scores),
            kk,
        ))
    }

    /// (vector, record dict) of one id.
    fn get<'py>(
        &self,
        py: Python<'py>,
        id: u64,
    ) -> PyResult<(Bound<'py, PyArray1<f32>>, Bound<'py, PyDict>)> {
        let (r, v) = self.read_inline(py, |s| s.get(id).map(|(r, v)| (r.clone(), v.to_vec())))?;
        Ok((PyArray1::from_vec(py, v), record_dict(py, &r)?))
    }

    /// Record dicts of many ids (unknown ids raise NotFoundError).
    fn get_records<'py>(&self, py: Python<'py>, ids: Vec<u64>) -> PyResult<Bound<'py, PyList>> {
        let recs = self.read_inline(py, |s| {
            ids.iter()
                .map(|&id| s.record(id).cloned().ok_or(Error::NotFound(id)))
                .collect::<Result<Vec<_>, _>>()
        })?;
        let out = PyList::empty(py);
        for r in &recs {
            out.append(record_dict(py, r)?)?;
        }
        Ok(out)
    }

    fn ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let ids = self.read_inline(py, |s| Ok(s.ids()))?;
        Ok(PyArray1::from_vec(py, ids))
    }

    /// Ids visible to a search with this filter / scope / archived rule:
    /// all of them (ascending), or only those of `among` (in its order).
    #[pyo3(signature = (filter=None, user_id=None, agent_id=None, session_id=None, include_archived=true, among=None))]
    #[allow(clippy::too_many_arguments)]
    fn matching_ids<'py>(
        &self,
        py: Python<'py>,
        filter: Option<String>,
        user_id: Option<String>,
        agent_id: Option<String>,
        session_id: Option<String>,
        include_archived: bool,
        among: Option<Vec<u64>>,
    ) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let ids = self.read(py, move |s| {
            let opts = search_options(filter, user_id, agent_id, session_id, include_archived)?;
            Ok(match &among {
                Some(ids) => s.matching_among(ids, &opts),
                None => s.matching_ids(&opts),
            })
        })?;
        Ok(PyArray1::from_vec(py, ids))
    }

    fn delete(&self, py: Python<'_>, ids: Vec<u64>) -> PyResult<usize> {
        self.write(py, move |s| s.delete(&ids))
    }

    /// Replace attributes of existing records; each dict has the keys that
    /// `get` returns (vector untouched).
    fn patch(&self, py: Python<'_>, records: Vec<Bound<'_, PyDict>>) -> PyResult<()> {
        let mut recs = Vec::with_capacity(records.len());
        for d in records {
            recs.push(dict_record(&d)?);
        }
        self.write(py, move |s| s.patch(recs))
    }

    /// Record accesses: (id, last_access, strength, access_count) tuples.
    fn touch(&self, py: Python<'_>, touches: Vec<(u64, f64, f32, u64)>) -> PyResult<()> {
        let t = touches
            .into_iter()
            .map(|(id, last_access, strength, access_count)| Touch {
                id,
                last_access,
                strength,
                access_count,
            })
            .collect();
        self.write(py, move |s| s.touch(t))
    }

    /// Rank one query by similarity or by the decayed score, follow links,
    /// and (with `reinforce`) record the recall of the direct hits. Returns
    /// (id, score, similarity, retention, importance, expanded, via) tuples.
    #[pyo3(signature = (query, k=10, filter=None, user_id=None, agent_id=None, session_id=None, include_archived=false, now=None, decay=true, weights=(1.0, 0.3, 0.2), reinforce=None, expand_links=0))]
    #[allow(clippy::too_many_arguments)]
    fn recall<'py>(
        &self,
        py: Python<'py>,
        query: PyReadonlyArray1<'py, f32>,
        k: usize,
        filter: Option<String>,
        user_id: Option<String>,
        agent_id: Option<String>,
        session_id: Option<String>,
        include_archived: bool,
        now: Option<f64>,
        decay: bool,
        weights: (f32, f32, f32),
        reinforce: Option<bool>,
        expand_links: usize,
    ) -> PyResult<Vec<RecallTuple>> {
        let q = query.as_slice()?;
        let now = now.unwrap_or_else(store::now_seconds);
        let hits = self.read(py, |s| {
            if q.len() != s.dim() {
                return Err(Error::DimensionMismatch {
                    expected: s.dim(),
                    got: q.len(),
                });
            }
            let opts = RecallOptions {
                search: search_options(filter, user_id, agent_id, session_id, include_archived)?,
                now,
                decay,
                weights: Weights {
                    similarity: weights.0,
                    retention: weights.1,
                    importance: weights.2,
                },
                expand_links,
            };
            s.recall(q, k, &opts)
        })?;
        let direct: Vec<u64> = hits.iter().filter(|h| !h.expanded).map(|h| h.id).collect();
        let writable = !self.read(py, |s| Ok(s.read_only()))?;
        if reinforce.unwrap_or(decay && writable) && !direct.is_empty() {
            self.write(py, move |s| s.reinforce(&direct, now))?;
        }
        Ok(hits
            .into_iter()
            .map(|h| {
                (
                    h.id,
                    h.score,
                    h.similarity,
                    h.retention,
                    h.importance,
                    h.expanded,
                    h.via,
                )
            })
            .collect())
    }

    /// Retention R = exp(-dt / S) of each id at `now`.
    #[pyo3(signature = (ids, now=None))]
    fn retention<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<u64>,
        now: Option<f64>,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let now = now.unwrap_or_else(store::now_seconds);
        let r = self.read(py, move |s| s.retention(&ids, now))?;
        Ok(PyArray1::from_vec(py, r))
    }

    /// Record a recall of `ids` at `now` (strength up, clock reset).
    #[pyo3(signature = (ids, now=None))]
    fn reinforce(&self, py: Python<'_>, ids: Vec<u64>, now: Option<f64>) -> PyResult<()> {
        let now = now.unwrap_or_else(store::now_seconds);
        self.write(py, move |s| s.reinforce(&ids, now))
    }

    /// Archive or delete records whose retention is below `threshold`.
    #[pyo3(signature = (threshold=0.05, now=None, delete=false, dry_run=false, filter=None, user_id=None, agent_id=None, session_id=None))]
    #[allow(clippy::too_many_arguments)]
    fn forget<'py>(
        &self,
        py: Python<'py>,
        threshold: f32,
        now: Option<f64>,
        delete: bool,
        dry_run: bool,
        filter: Option<String>,
        user_id: Option<String>,
        agent_id: Option<String>,
        session_id: Option<String>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let now = now.unwrap_or_else(store::now_seconds);
        let rep = self.write(py, move |s| {
            let scope = search_options(filter, user_id, agent_id, session_id, delete)?;
            s.forget(threshold, now, delete, dry_run, &scope)
        })?;
        let d = PyDict::new(py);
        d.set_item("action", if rep.archived { "archive" } else { "delete" })?;
        d.set_item("dry_run", rep.dry_run)?;
        d.set_item("threshold", threshold)?;
        d.set_item("now", now)?;
        d.set_item("examined", rep.examined)?;
        d.set_item("ids", rep.ids)?;
        d.set_item("retentions", rep.retentions)?;
        Ok(d)
    }

    #[pyo3(signature = (a, b, kind="related".to_string(), weight=1.0))]
    fn link(&self, py: Python<'_>, a: u64, b: u64, kind: String, weight: f32) -> PyResult<()> {
        self.write(py, move |s| s.link(a, b, &kind, weight))
    }

    fn unlink(&self, py: Python<'_>, a: u64, b: u64) -> PyResult<bool> {
        self.write(py, move |s| s.unlink(a, b))
    }

    fn links(&self, py: Python<'_>, id: u64) -> PyResult<Vec<(u64, String, f32)>> {
        self.read(py, move |s| {
            let r = s.record(id).ok_or(Error::NotFound(id))?;
            Ok(r.links
                .iter()
                .map(|l| (l.target, l.kind.clone(), l.weight))
                .collect())
        })
    }

    /// Tune the forgetting curve and the link degree cap for this handle.
    #[pyo3(signature = (decay_unit_seconds=None, reinforce_increment=None, reset_on_recall=None, max_degree=None))]
    fn configure(
        &self,
        py: Python<'_>,
        decay_unit_seconds: Option<f64>,
        reinforce_increment: Option<f32>,
        reset_on_recall: Option<bool>,
        max_degree: Option<usize>,
    ) -> PyResult<()> {
        self.write(py, move |s| {
            if let Some(u) = decay_unit_seconds {
                if !(u.is_finite() && u > 0.0) {
                    return Err(Error::InvalidArgument(
                        "decay unit must be a positive number of seconds".into(),
                    ));
                }
                s.decay.unit_seconds = u;
            }
            if let Some(i) = reinforce_increment {
                if !(i.is_finite() && i >= 0.0) {
                    return Err(Error::InvalidArgument(
                        "reinforce increment must be >= 0".into(),
                    ));
                }
                s.decay.increment = i;
            }
            if let Some(r) = reset_on_recall {
                s.decay.reset_on_recall = r;
            }
            if let Some(m) = max_degree {
                if m == 0 {
                    return Err(Error::InvalidArgument(
                        "max_degree must be at least 1".into(),
                    ));
                }
                s.max_degree = m;
            }
            Ok(())
        })
    }

    fn flush(&self, py: Python<'_>) -> PyResult<()> {
        self.write(py, |s| s.flush())
    }

    fn checkpoint(&self, py: Python<'_>) -> PyResult<()> {
        self.write(py, |s| s.checkpoint())
    }

    /// Release the writer lock and drop all state. Idempotent.
    fn close(&self, py: Python<'_>) {
        py.detach(|| {
            self.inner.write().unwrap().take();
        });
    }

    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let info = self.read(py, |s| Ok(s.info()))?;
        info_dict(py, &info)
    }
}

/// (id, score, similarity, retention, importance, expanded, via)
type RecallTuple = (u64, f32, f32, f32, f32, bool, Option<u64>);

fn search_options(
    filter: Option<String>,
    user_id: Option<String>,
    agent_id: Option<String>,
    session_id: Option<String>,
    include_archived: bool,
) -> Result<SearchOptions, Error> {
    let filter = match parse_json(filter, "filter")? {
        Some(v) => Some(Filter::parse(&v)?),
        None => None,
    };
    Ok(SearchOptions {
        filter,
        scope: Scope {
            user_id,
            agent_id,
            session_id,
        },
        include_archived,
        exact: false,
    })
}

fn info_dict<'py>(py: Python<'py>, i: &store::Info) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("path", i.path.to_string_lossy())?;
    d.set_item("dim", i.dim)?;
    d.set_item("metric", i.metric.name())?;
    d.set_item("count", i.count)?;
    d.set_item("generation", i.generation)?;
    d.set_item("segment_bytes", i.segment_bytes)?;
    d.set_item("wal_bytes", i.wal_bytes)?;
    d.set_item("wal_frames", i.wal_frames)?;
    d.set_item("torn_bytes", i.torn_bytes)?;
    d.set_item("kernel", i.kernel)?;
    d.set_item("index", i.index)?;
    Ok(d)
}

fn dict_record(d: &Bound<'_, PyDict>) -> PyResult<Record> {
    fn get<'py, T: FromPyObjectOwned<'py>>(d: &Bound<'py, PyDict>, k: &str) -> PyResult<T> {
        match d.get_item(k)? {
            Some(v) => v.extract::<T>().map_err(Into::into),
            None => Err(pyo3::exceptions::PyKeyError::new_err(k.to_string())),
        }
    }
    let meta: Option<String> = get(d, "metadata")?;
    let metadata = meta
        .map(|s| serde_json::from_str(&s))
        .transpose()
        .map_err(|e| {
            pyo3::exceptions::PyValueError::new_err(format!("metadata is not valid JSON: {e}"))
        })?;
    let links: Vec<(u64, String, f32)> = get(d, "links")?;
    Ok(Record {
        id: get(d, "id")?,
        text: get(d, "text")?,
        metadata,
        scope: Scope {
            user_id: get(d, "user_id")?,
            agent_id: get(d, "agent_id")?,
            session_id: get(d, "session_id")?,
        },
        importance: get(d, "importance")?,
        strength: get(d, "strength")?,
        created_at: get(d, "created_at")?,
        updated_at: get(d, "updated_at")?,
        last_access: get(d, "last_access")?,
        access_count: get(d, "access_count")?,
        archived: get(d, "archived")?,
        links: links
            .into_iter()
            .map(|(target, kind, weight)| Link {
                target,
                kind,
                weight,
            })
            .collect(),
    })
}

/// Check every checksum of the store at `path` without locking it.
#[pyfunction]
pub fn verify_store<'py>(
    py: Python<'py>,
    path: std::path::PathBuf,
) -> PyResult<Bound<'py, PyDict>> {
    let info = run(py, move || store::verify(&path))?;
    info_dict(py, &info)
}

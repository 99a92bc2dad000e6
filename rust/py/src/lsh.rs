//! `NativeLsh`: the binding of the standalone cosine LSH index.

use crate::gil::{run, with_read, with_write};
use crate::hits;
use engramdb_core::index::lsh::LshIndex;
use engramdb_core::index::VectorIndex;
use engramdb_core::{distance, Error};
use numpy::{PyArray1, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;
use std::sync::RwLock;

#[pyclass(module = "engramdb._native", frozen)]
pub struct NativeLsh {
    inner: RwLock<Option<LshIndex>>,
    dim: usize,
}

fn prepare(data: &[f32], n: usize, dim: usize, d: usize) -> Result<Vec<f32>, Error> {
    if d != dim {
        return Err(Error::DimensionMismatch {
            expected: dim,
            got: d,
        });
    }
    if n == 0 {
        return Err(Error::EmptyInput("no vectors given".into()));
    }
    distance::check_finite(data, dim)?;
    let mut v = data.to_vec();
    for row in v.chunks_exact_mut(dim) {
        distance::normalize(row)?;
    }
    Ok(v)
}

#[pymethods]
impl NativeLsh {
    #[new]
    #[pyo3(signature = (dim, tables=16, bits=12, seed=0))]
    fn new(py: Python<'_>, dim: usize, tables: usize, bits: usize, seed: u64) -> PyResult<Self> {
        let idx = run(py, || LshIndex::new(dim, tables, bits, seed))?;
        Ok(NativeLsh {
            inner: RwLock::new(Some(idx)),
            dim,
        })
    }

    #[getter]
    fn dim(&self) -> usize {
        self.dim
    }

    #[getter]
    fn tables(&self) -> usize {
        self.inner
            .read()
            .unwrap()
            .as_ref()
            .map_or(0, |i| i.params().0)
    }

    #[getter]
    fn bits(&self) -> usize {
        self.inner
            .read()
            .unwrap()
            .as_ref()
            .map_or(0, |i| i.params().1)
    }

    fn __len__(&self) -> usize {
        self.inner.read().unwrap().as_ref().map_or(0, |i| i.len())
    }

    /// Candidates scored by the last search, over all its queries.
    fn last_candidates(&self) -> usize {
        self.inner
            .read()
            .unwrap()
            .as_ref()
            .map_or(0, |i| i.last_candidates())
    }

    fn add<'py>(
        &self,
        py: Python<'py>,
        vectors: PyReadonlyArray2<'py, f32>,
        ids: PyReadonlyArray1<'py, u64>,
    ) -> PyResult<()> {
        let (n, d) = (vectors.shape()[0], vectors.shape()[1]);
        let data = vectors.as_slice()?;
        let ids = ids.as_slice()?;
        let dim = self.dim;
        with_write(py, &self.inner, |idx| {
            if ids.len() != n {
                return Err(Error::InvalidArgument(format!(
                    "{} ids for {n} vectors",
                    ids.len()
                )));
            }
            let v = prepare(data, n, dim, d)?;
            idx.upsert(ids, &v);
            Ok(())
        })
    }

    fn delete(&self, py: Python<'_>, ids: Vec<u64>) -> PyResult<()> {
        with_write(py, &self.inner, |idx| {
            idx.remove(&ids);
            Ok(())
        })
    }

    /// (ids, cosine scores, k): flat arrays; missing slots hold 2**64-1 / NaN.
    #[pyo3(signature = (queries, k=10))]
    #[allow(clippy::type_complexity)]
    fn search<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        k: usize,
    ) -> PyResult<(Bound<'py, PyArray1<u64>>, Bound<'py, PyArray1<f32>>, usize)> {
        let (m, d) = (queries.shape()[0], queries.shape()[1]);
        let data = queries.as_slice()?;
        let dim = self.dim;
        let (ids, scores) = with_read(py, &self.inner, |idx| {
            if k == 0 {
                return Err(Error::InvalidArgument("k must be at least 1".into()));
            }
            let q = prepare(data, m, dim, d)?;
            let hits = idx.search(&q, k, None);
            Ok(hits::pack(&hits, k, |x| x))
        })?;
        Ok((
            PyArray1::from_vec(py, ids),
            PyArray1::from_vec(py, scores),
            k,
        ))
    }
}

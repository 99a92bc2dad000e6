//! Exact (brute-force) search over a dense, contiguous arena of vectors.
//!
//! Layout: `data` holds `len * dim` floats row by row, `ids[row]` names each
//! row and `rows` maps an id back to its row. Removal swaps the last row into
//! the hole, so the arena stays dense and a scan never skips tombstones.
//!
//! Search splits the arena into blocks of [`BLOCK`] rows and spreads them over
//! the current rayon pool; each worker keeps one top-k per query. With four or
//! more queries a block is scored as one matrix product (`matrixmultiply`'s
//! packed, register-blocked sgemm), so each vector is read from memory once
//! per batch instead of once per query; with fewer queries the SIMD dot kernel
//! streams the block directly.

use super::{IdFilter, VectorIndex};
use crate::distance::{self, Metric};
use crate::topk::{Hit, TopK};
use rayon::prelude::*;
use std::collections::HashMap;

/// Rows per work unit: 1024 x 384 floats is 1.5 MiB, which stays in L2/L3
/// while every query of a batch is scored against it.
pub const BLOCK: usize = 1024;

/// Queries per batch from which a block is scored by sgemm.
const GEMM_MIN_QUERIES: usize = 4;

#[derive(Debug, Clone)]
pub struct FlatIndex {
    dim: usize,
    metric: Metric,
    data: Vec<f32>,
    ids: Vec<u64>,
    /// Squared norms per row, kept only for L2 (used by the sgemm path).
    norms: Vec<f32>,
    rows: HashMap<u64, usize>,
}

impl FlatIndex {
    pub fn new(dim: usize, metric: Metric) -> Self {
        FlatIndex {
            dim,
            metric,
            data: Vec::new(),
            ids: Vec::new(),
            norms: Vec::new(),
            rows: HashMap::new(),
        }
    }

    pub fn with_capacity(dim: usize, metric: Metric, n: usize) -> Self {
        let mut f = Self::new(dim, metric);
        f.data.reserve(n * dim);
        f.ids.reserve(n);
        f.rows.reserve(n);
        f
    }

    /// The stored (prepared) vector of `id`.
    pub fn vector(&self, id: u64) -> Option<&[f32]> {
        self.rows
            .get(&id)
            .map(|&r| &self.data[r * self.dim..(r + 1) * self.dim])
    }

    pub fn contains(&self, id: u64) -> bool {
        self.rows.contains_key(&id)
    }

    /// Ids in arena order.
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }

    /// The arena, row-major, in the order of [`FlatIndex::ids`].
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// Bytes of RAM held by vectors and bookkeeping (approximate).
    pub fn ram_bytes(&self) -> usize {
        self.data.capacity() * 4
            + self.ids.capacity() * 8
            + self.norms.capacity() * 4
            + self.rows.capacity() * 24
    }

    fn set_row(&mut self, row: usize, v: &[f32]) {
        self.data[row * self.dim..(row + 1) * self.dim].copy_from_slice(v);
        if self.metric == Metric::L2 {
            self.norms[row] = distance::dot(v, v);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn scan_rows(
        &self,
        queries: &[f32],
        qnorms: &[f32],
        start: usize,
        end: usize,
        tops: &mut [TopK],
        scratch: &mut Vec<f32>,
        keep: Option<&[bool]>,
    ) {
        let ok = |row: usize| keep.is_none_or(|k| k[row]);
        let d = self.dim;
        let m = tops.len();
        let rows = end - start;
        if m >= GEMM_MIN_QUERIES {
            scratch.clear();
            scratch.resize(m * rows, 0.0);
            let block = &self.data[start * d..end * d];
            // SAFETY: the pointers cover m*d, rows*d and m*rows floats with the
            // strides given (A: m x d row-major, B = block^T: d x rows,
            // C: m x rows row-major), all in bounds of their slices.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    d,
                    rows,
                    1.0,
                    queries.as_ptr(),
                    d as isize,
                    1,
                    block.as_ptr(),
                    1,
                    d as isize,
                    0.0,
                    scratch.as_mut_ptr(),
                    rows as isize,
                    1,
                );
            }
            for (qi, top) in tops.iter_mut().enumerate() {
                let row_scores = &scratch[qi * rows..(qi + 1) * rows];
                let mut thr = top.threshold();
                for (j, &ip) in row_scores.iter().enumerate() {
                    let s = if self.metric == Metric::L2 {
                        2.0 * ip - self.norms[start + j] - qnorms[qi]
                    } else {
                        ip
                    };
                    if s >= thr && ok(start + j) {
                        top.push(self.ids[start + j], s);
                        thr = top.threshold();
                    }
                }
            }
        } else {
            scratch.clear();
            scratch.resize(rows, 0.0);
            let block = &self.data[start * d..end * d];
            for (qi, top) in tops.iter_mut().enumerate() {
                let q = &queries[qi * d..(qi + 1) * d];
                if self.metric == Metric::L2 {
                    for (j, row) in block.chunks_exact(d).enumerate() {
                        scratch[j] = -distance::l2_squared(q, row);
                    }
                } else {
                    distance::dot_rows(q, block, scratch);
                }
                let mut thr = top.threshold();
                for (j, &s) in scratch.iter().enumerate() {
                    if s >= thr && ok(start + j) {
                        top.push(self.ids[start + j], s);
                        thr = top.threshold();
                    }
                }
            }
        }
    }

    /// Rows whose id `filter` accepts (valid until the next write).
    pub fn rows_matching(&self, filter: &IdFilter) -> Vec<usize> {
        (0..self.ids.len())
            .into_par_iter()
            .filter(|&r| filter(self.ids[r]))
            .collect()
    }

    fn search_filtered(&self, queries: &[f32], k: usize, filter: &IdFilter) -> Vec<Vec<Hit>> {
        let rows = self.rows_matching(filter);
        self.search_rows(queries, k, &rows)
    }

    /// Exact top-`k` among the given rows (from [`FlatIndex::rows_matching`]
    /// on the current contents).
    pub fn search_rows(&self, queries: &[f32], k: usize, rows: &[usize]) -> Vec<Vec<Hit>> {
        let d = self.dim;
        let m = queries.len() / d;
        if rows.len() >= self.ids.len() / 2 {
            // a dense subset: scan blocks, skip rows outside it by a bitmap
            let mut keep = vec![false; self.ids.len()];
            rows.iter().for_each(|&r| keep[r] = true);
            return self.scan_all(queries, k, Some(&keep));
        }
        (0..m)
            .into_par_iter()
            .map(|qi| {
                let q = &queries[qi * d..(qi + 1) * d];
                let mut top = TopK::new(k);
                for &r in rows {
                    let s = self.metric.similarity(q, &self.data[r * d..(r + 1) * d]);
                    top.push(self.ids[r], s);
                }
                top.into_sorted()
            })
            .collect()
    }
}

impl VectorIndex for FlatIndex {
    fn dim(&self) -> usize {
        self.dim
    }

    fn metric(&self) -> Metric {
        self.metric
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    fn upsert(&mut self, ids: &[u64], vectors: &[f32]) {
        debug_assert_eq!(ids.len() * self.dim, vectors.len());
        for (i, &id) in ids.iter().enumerate() {
            let v = &vectors[i * self.dim..(i + 1) * self.dim];
            match self.rows.get(&id) {
                Some(&row) => self.set_row(row, v),
                None => {
                    let row = self.ids.len();
                    self.ids.push(id);
                    self.data.extend_from_slice(v);
                    if self.metric == Metric::L2 {
                        self.norms.push(0.0);
                    }
                    self.rows.insert(id, row);
                    self.set_row(row, v);
                }
            }
        }
    }

    fn remove(&mut self, ids: &[u64]) {
        let d = self.dim;
        for id in ids {
            let Some(row) = self.rows.remove(id) else {
                continue;
            };
            let last = self.ids.len() - 1;
            if row != last {
                self.data.copy_within(last * d..(last + 1) * d, row * d);
                self.ids[row] = self.ids[last];
                if self.metric == Metric::L2 {
                    self.norms[row] = self.norms[last];
                }
                self.rows.insert(self.ids[row], row);
            }
            self.ids.pop();
            self.data.truncate(last * d);
            if self.metric == Metric::L2 {
                self.norms.pop();
            }
        }
    }

    fn search(&self, queries: &[f32], k: usize, filter: Option<&IdFilter>) -> Vec<Vec<Hit>> {
        let m = queries.len() / self.dim;
        if m == 0 || k == 0 || self.ids.is_empty() {
            return vec![Vec::new(); m];
        }
        match filter {
            Some(f) => self.search_filtered(queries, k, f),
            None => self.scan_all(queries, k, None),
        }
    }
}

impl FlatIndex {
    /// Scan every block; with `keep`, drop rows marked false after scoring
    /// (for dense subsets, where scoring everything is cheapest).
    fn scan_all(&self, queries: &[f32], k: usize, keep: Option<&[bool]>) -> Vec<Vec<Hit>> {
        let d = self.dim;
        let m = queries.len() / d;
        if m == 0 || k == 0 || self.ids.is_empty() {
            return vec![Vec::new(); m];
        }
        let qnorms: Vec<f32> = if self.metric == Metric::L2 {
            queries
                .chunks_exact(d)
                .map(|q| distance::dot(q, q))
                .collect()
        } else {
            vec![0.0; m]
        };
        let n = self.ids.len();
        let nblocks = n.div_ceil(BLOCK);
        let tops = (0..nblocks)
            .into_par_iter()
            .fold(
                || (vec![TopK::new(k); m], Vec::new()),
                |(mut tops, mut scratch), b| {
                    let start = b * BLOCK;
                    let end = (start + BLOCK).min(n);
                    self.scan_rows(queries, &qnorms, start, end, &mut tops, &mut scratch, keep);
                    (tops, scratch)
                },
            )
            .map(|(tops, _)| tops)
            .reduce(
                || vec![TopK::new(k); m],
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(b) {
                        x.merge(y);
                    }
                    a
                },
            );
        tops.into_iter().map(TopK::into_sorted).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topk::better;

    fn data(n: usize, d: usize, seed: u64) -> Vec<f32> {
        crate::testdata::uniform(n, d, seed)
    }

    fn brute(idx: &FlatIndex, q: &[f32], k: usize) -> Vec<u64> {
        let mut all: Vec<Hit> = idx
            .ids()
            .iter()
            .map(|&id| Hit {
                id,
                score: idx.metric.similarity(q, idx.vector(id).unwrap()),
            })
            .collect();
        all.sort_by(better);
        all.iter().take(k).map(|h| h.id).collect()
    }

    #[test]
    fn batch_and_single_paths_agree_with_brute_force() {
        for metric in [Metric::Ip, Metric::L2] {
            let (n, d) = (3000, 24);
            let mut idx = FlatIndex::new(d, metric);
            let ids: Vec<u64> = (0..n as u64).map(|i| i * 3 + 1).collect();
            idx.upsert(&ids, &data(n, d, 1));
            let qs = data(9, d, 2);
            let batch = idx.search(&qs, 10, None);
            for (qi, q) in qs.chunks_exact(d).enumerate() {
                let single = idx.search(q, 10, None);
                let want = brute(&idx, q, 10);
                let got: Vec<u64> = single[0].iter().map(|h| h.id).collect();
                assert_eq!(got, want, "{metric:?} single");
                let got_b: Vec<u64> = batch[qi].iter().map(|h| h.id).collect();
                // sgemm sums in another order: allow ties within rounding to swap
                let overlap = got_b.iter().filter(|i| want.contains(i)).count();
                assert!(overlap >= 9, "{metric:?} batch {got_b:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn remove_keeps_arena_dense_and_consistent() {
        let d = 8;
        let mut idx = FlatIndex::new(d, Metric::L2);
        let ids: Vec<u64> = (0..100).collect();
        let v = data(100, d, 3);
        idx.upsert(&ids, &v);
        idx.remove(&[0, 50, 99, 1234]);
        assert_eq!(idx.len(), 97);
        for id in ids.iter().filter(|i| ![0, 50, 99].contains(*i)) {
            assert_eq!(
                idx.vector(*id).unwrap(),
                &v[*id as usize * d..(*id as usize + 1) * d]
            );
        }
        assert!(idx.vector(50).is_none());
        let q = &v[10 * d..11 * d];
        assert_eq!(idx.search(q, 1, None)[0][0].id, 10);
    }

    #[test]
    fn filter_returns_exact_topk_among_matches() {
        let d = 16;
        let mut idx = FlatIndex::new(d, Metric::Ip);
        let ids: Vec<u64> = (0..2000).collect();
        idx.upsert(&ids, &data(2000, d, 4));
        let q = data(1, d, 5);
        let f = |id: u64| id % 100 == 7;
        let got = idx.search(&q, 50, Some(&f));
        assert_eq!(got[0].len(), 20, "all 20 matching ids are returned");
        assert!(got[0].iter().all(|h| h.id % 100 == 7));
    }
}

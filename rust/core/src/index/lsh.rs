//! Random-hyperplane LSH (SimHash) for cosine similarity.
//!
//! Each of `tables` tables hashes a vector to `bits` sign bits of its dot
//! products with random Gaussian hyperplanes; two vectors at angle θ agree
//! on one bit with probability 1 - θ/π, so on a whole table key with
//! (1 - θ/π)^bits, and share at least one of the tables with
//! 1 - (1 - (1 - θ/π)^bits)^tables. [`LshTables`] holds only signatures and
//! buckets (the store uses it for near-duplicate candidates next to its own
//! vectors); [`LshIndex`] adds the vectors and exact reranking, a complete
//! approximate index used as a fast filter and as an honest baseline.

use super::flat::FlatIndex;
use super::{IdFilter, VectorIndex};
use crate::distance::{self, Metric};
use crate::error::{Error, Result};
use crate::topk::{Hit, TopK};
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};

/// Hyperplanes and buckets.
#[derive(Debug, Clone)]
pub struct LshTables {
    dim: usize,
    tables: usize,
    bits: usize,
    planes: Vec<f32>,
    buckets: Vec<HashMap<u32, Vec<u64>>>,
    keys: HashMap<u64, Vec<u32>>,
}

fn gaussians(seed: u64, n: usize) -> Vec<f32> {
    // splitmix64 into Box-Muller: deterministic for a seed on every platform
    let mut rng = crate::rng::Rng::from_state(seed);
    let mut next = || rng.next_f64();
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (next().max(1e-300), next());
        let r = (-2.0 * u1.ln()).sqrt();
        out.push((r * (2.0 * std::f64::consts::PI * u2).cos()) as f32);
        out.push((r * (2.0 * std::f64::consts::PI * u2).sin()) as f32);
    }
    out.truncate(n);
    out
}

impl LshTables {
    pub fn new(dim: usize, tables: usize, bits: usize, seed: u64) -> Result<Self> {
        if dim == 0 || tables == 0 || !(1..=32).contains(&bits) {
            return Err(Error::InvalidArgument(format!(
                "LSH needs dim >= 1, tables >= 1 and 1 <= bits <= 32 (got {dim}, {tables}, {bits})"
            )));
        }
        Ok(LshTables {
            dim,
            tables,
            bits,
            planes: gaussians(seed, tables * bits * dim),
            buckets: vec![HashMap::new(); tables],
            keys: HashMap::new(),
        })
    }

    pub fn params(&self) -> (usize, usize) {
        (self.tables, self.bits)
    }

    /// One key per table.
    pub fn keys_of(&self, v: &[f32]) -> Vec<u32> {
        let mut proj = vec![0.0f32; self.tables * self.bits];
        distance::dot_rows(v, &self.planes, &mut proj);
        proj.chunks_exact(self.bits)
            .map(|c| {
                c.iter()
                    .enumerate()
                    .fold(0u32, |k, (i, &p)| k | ((p >= 0.0) as u32) << i)
            })
            .collect()
    }

    pub fn insert(&mut self, id: u64, v: &[f32]) {
        self.remove(id);
        let keys = self.keys_of(v);
        for (t, &k) in keys.iter().enumerate() {
            self.buckets[t].entry(k).or_default().push(id);
        }
        self.keys.insert(id, keys);
    }

    pub fn remove(&mut self, id: u64) {
        if let Some(keys) = self.keys.remove(&id) {
            for (t, k) in keys.into_iter().enumerate() {
                if let Some(b) = self.buckets[t].get_mut(&k) {
                    b.retain(|&x| x != id);
                    if b.is_empty() {
                        self.buckets[t].remove(&k);
                    }
                }
            }
        }
    }

    /// Ids sharing at least one table key with `v`, without repeats.
    pub fn candidates(&self, v: &[f32]) -> Vec<u64> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for (t, k) in self.keys_of(v).into_iter().enumerate() {
            if let Some(b) = self.buckets[t].get(&k) {
                for &id in b {
                    if seen.insert(id) {
                        out.push(id);
                    }
                }
            }
        }
        out
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.dim
    }
}

/// A complete cosine LSH index: tables plus the vectors for exact rerank.
#[derive(Debug, Clone)]
pub struct LshIndex {
    tables: LshTables,
    vectors: FlatIndex,
    last_candidates: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl LshIndex {
    pub fn new(dim: usize, tables: usize, bits: usize, seed: u64) -> Result<Self> {
        Ok(LshIndex {
            tables: LshTables::new(dim, tables, bits, seed)?,
            vectors: FlatIndex::new(dim, Metric::Cosine),
            last_candidates: Default::default(),
        })
    }

    /// Candidates scored by the last search, summed over its queries.
    pub fn last_candidates(&self) -> usize {
        self.last_candidates
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn params(&self) -> (usize, usize) {
        self.tables.params()
    }
}

impl VectorIndex for LshIndex {
    fn dim(&self) -> usize {
        self.tables.dim
    }

    fn metric(&self) -> Metric {
        Metric::Cosine
    }

    fn len(&self) -> usize {
        self.vectors.len()
    }

    fn upsert(&mut self, ids: &[u64], vectors: &[f32]) {
        let d = self.tables.dim;
        for (i, &id) in ids.iter().enumerate() {
            self.tables.insert(id, &vectors[i * d..(i + 1) * d]);
        }
        self.vectors.upsert(ids, vectors);
    }

    fn remove(&mut self, ids: &[u64]) {
        for &id in ids {
            self.tables.remove(id);
        }
        self.vectors.remove(ids);
    }

    fn search(&self, queries: &[f32], k: usize, filter: Option<&IdFilter>) -> Vec<Vec<Hit>> {
        let d = self.tables.dim;
        let results: Vec<(Vec<Hit>, usize)> = queries
            .par_chunks_exact(d)
            .map(|q| {
                let cands = self.tables.candidates(q);
                let mut top = TopK::new(k);
                let mut scored = 0;
                for id in cands {
                    if filter.is_some_and(|f| !f(id)) {
                        continue;
                    }
                    if let Some(v) = self.vectors.vector(id) {
                        top.push(id, distance::dot(q, v));
                        scored += 1;
                    }
                }
                (top.into_sorted(), scored)
            })
            .collect();
        let total = results.iter().map(|r| r.1).sum();
        self.last_candidates
            .store(total, std::sync::atomic::Ordering::Relaxed);
        results.into_iter().map(|r| r.0).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit_rows(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut v = gaussians(seed, n * d);
        for r in v.chunks_exact_mut(d) {
            distance::normalize(r).unwrap();
        }
        v
    }

    #[test]
    fn finds_near_duplicates_and_misses_little() {
        let (n, d) = (2000, 64);
        let base = unit_rows(n, d, 1);
        let mut idx = LshIndex::new(d, 16, 10, 7).unwrap();
        let ids: Vec<u64> = (0..n as u64).collect();
        idx.upsert(&ids, &base);
        // queries: small perturbations of base rows (cosine ~0.95)
        let noise = unit_rows(100, d, 2);
        let mut qs = Vec::new();
        for i in 0..100 {
            let mut q: Vec<f32> = (0..d)
                .map(|j| base[i * d + j] + 0.3 * noise[i * d + j])
                .collect();
            distance::normalize(&mut q).unwrap();
            qs.extend(q);
        }
        let hits = idx.search(&qs, 1, None);
        let found = hits
            .iter()
            .enumerate()
            .filter(|(i, h)| h.first().map(|x| x.id) == Some(*i as u64))
            .count();
        assert!(found >= 95, "found {found}/100");
        assert!(
            idx.last_candidates() < 100 * n / 4,
            "LSH must prune: {}",
            idx.last_candidates()
        );
        idx.remove(&[0]);
        assert!(idx.search(&qs[..d], 5, None)[0].iter().all(|h| h.id != 0));
    }

    #[test]
    fn deterministic_for_a_seed_and_validates_params() {
        let a = LshTables::new(8, 2, 4, 3).unwrap();
        let b = LshTables::new(8, 2, 4, 3).unwrap();
        assert_eq!(a.planes, b.planes);
        assert!(LshTables::new(8, 2, 33, 3).is_err());
        assert!(LshTables::new(0, 2, 3, 3).is_err());
    }
}

//! Vector indexes. Every index implements [`VectorIndex`]; the store and the
//! binding hold them behind an enum, never as generics.
//!
//! Vectors handed to an index are already *prepared*: finite, of the right
//! dimension, and unit-normalised when the metric is cosine. Similarities are
//! "higher is closer" (see [`crate::distance`]).

pub mod flat;
pub mod lsh;
pub mod spann;

use crate::distance::Metric;
use crate::topk::Hit;

/// A predicate on ids, evaluated inside the search (never as a post-filter),
/// so a filtered search returns the true top-k among the matching ids.
pub type IdFilter<'a> = dyn Fn(u64) -> bool + Sync + 'a;

/// The role every index plays.
pub trait VectorIndex: Send + Sync {
    fn dim(&self) -> usize;
    fn metric(&self) -> Metric;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Insert new ids or replace the vectors of existing ones.
    fn upsert(&mut self, ids: &[u64], vectors: &[f32]);
    /// Remove ids; unknown ids are ignored (the store validates first).
    fn remove(&mut self, ids: &[u64]);
    /// The `k` best hits for each query in `queries` (row-major, `dim` wide),
    /// best first, restricted to ids accepted by `filter`.
    fn search(&self, queries: &[f32], k: usize, filter: Option<&IdFilter>) -> Vec<Vec<Hit>>;
}

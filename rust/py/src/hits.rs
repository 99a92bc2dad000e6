//! Search results as the flat numpy-ready arrays every `search` returns.

use engramdb_core::topk::Hit;
use numpy::PyArray1;
use pyo3::prelude::*;

/// What a binding's `search` returns: flat ids, flat scores (row-major
/// `(m, k)`), and the row width k.
pub type SearchResult<'py> = (Bound<'py, PyArray1<u64>>, Bound<'py, PyArray1<f32>>, usize);

/// The id of an empty result slot (`engramdb.MISSING_ID`); its score is NaN.
pub const MISSING_ID: u64 = u64::MAX;

/// Lay out per-query hit lists as row-major `(m, k)` id and score arrays,
/// padding short rows with [`MISSING_ID`] / NaN and mapping each internal
/// similarity through `score` (e.g. [`engramdb_core::Metric::user_score`]).
pub fn pack(hits: &[Vec<Hit>], k: usize, score: impl Fn(f32) -> f32) -> (Vec<u64>, Vec<f32>) {
    let m = hits.len();
    let mut ids = vec![MISSING_ID; m * k];
    let mut scores = vec![f32::NAN; m * k];
    for (qi, row) in hits.iter().enumerate() {
        for (j, h) in row.iter().take(k).enumerate() {
            ids[qi * k + j] = h.id;
            scores[qi * k + j] = score(h.score);
        }
    }
    (ids, scores)
}

//! Bounded top-k selection: keep the `k` best (similarity, id) pairs seen so
//! far in a min-heap, rejecting most candidates with one comparison against
//! the current k-th best. Ties are broken by the smaller id, so results are
//! deterministic whatever order candidates arrive in.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// One search result: an id and its similarity (higher is closer).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub id: u64,
    pub score: f32,
}

/// Total order "better first": higher score, then smaller id. A NaN score
/// (only damaged index files can produce one) ranks worst: treating it as
/// equal to everything broke the total order, and the standard sort panics
/// on that (found by fuzzing the SPANN files).
#[inline]
pub fn better(a: &Hit, b: &Hit) -> Ordering {
    let key = |s: f32| if s.is_nan() { f32::NEG_INFINITY } else { s };
    key(b.score)
        .partial_cmp(&key(a.score))
        .unwrap_or(Ordering::Equal)
        .then(a.id.cmp(&b.id))
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Entry(Hit);

impl Eq for Entry {}

impl Ord for Entry {
    // The heap's maximum is the *worst* kept hit, so it can be evicted.
    fn cmp(&self, other: &Self) -> Ordering {
        better(&self.0, &other.0)
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Collects the best `k` hits.
#[derive(Debug, Clone)]
pub struct TopK {
    k: usize,
    heap: BinaryHeap<Entry>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        // k comes from callers and from index parameters read from disk:
        // reserve for a bounded start and let the heap grow with its items
        TopK {
            k,
            heap: BinaryHeap::with_capacity(k.saturating_add(1).min(4096)),
        }
    }

    /// The score a candidate must beat (or tie with a smaller id) to enter.
    #[inline]
    pub fn threshold(&self) -> f32 {
        if self.heap.len() < self.k {
            f32::NEG_INFINITY
        } else {
            self.heap.peek().map_or(f32::NEG_INFINITY, |e| e.0.score)
        }
    }

    #[inline]
    pub fn push(&mut self, id: u64, score: f32) {
        if self.k == 0 {
            return;
        }
        let hit = Hit { id, score };
        if self.heap.len() < self.k {
            self.heap.push(Entry(hit));
        } else if let Some(mut worst) = self.heap.peek_mut() {
            // replace the worst in place: one sift down instead of a pop
            // and a push
            if better(&hit, &worst.0) == Ordering::Less {
                *worst = Entry(hit);
            }
        }
    }

    pub fn merge(&mut self, other: TopK) {
        for e in other.heap {
            self.push(e.0.id, e.0.score);
        }
    }

    /// The kept hits, best first.
    pub fn into_sorted(self) -> Vec<Hit> {
        let mut v: Vec<Hit> = self.heap.into_iter().map(|e| e.0).collect();
        v.sort_by(better);
        v
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_best_k_in_order_with_id_tiebreak() {
        let mut t = TopK::new(3);
        for (id, s) in [(5, 0.1), (1, 0.9), (2, 0.5), (9, 0.9), (3, 0.5), (4, -1.0)] {
            t.push(id, s);
        }
        let ids: Vec<u64> = t.into_sorted().iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![1, 9, 2]);
    }

    #[test]
    fn matches_full_sort() {
        let mut g = crate::testdata::Lcg::new(1);
        let mut all = Vec::new();
        let mut t = TopK::new(17);
        for id in 0..1000u64 {
            let s = ((g.next_u64() >> 33) % 100) as f32; // many ties
            all.push(Hit { id, score: s });
            t.push(id, s);
        }
        all.sort_by(better);
        assert_eq!(t.into_sorted(), all[..17].to_vec());
    }
}

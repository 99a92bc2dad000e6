//! Building a SPANN index: heads by balanced hierarchical k-means, a coarse
//! level over the heads (so finding the nearest heads scans a few percent of
//! them), and RNG-rule assignment of every vector to up to `replicas`
//! postings.
//!
//! Balanced k-means: each assignment step adds to the squared distance a
//! penalty proportional to the cluster's size in the previous step, which
//! pushes points from crowded clusters to the next-nearest one (the idea of
//! SPTAG's balanced k-means; the penalty weight is [`super::SpannParams::balance`]
//! times the mean squared distance, per average cluster size). Training runs on
//! a random subsample of at most `sample_per_centroid * k` points; the final
//! assignment covers every point. Nodes are split recursively (`branch`-way)
//! until they are small enough for one final k-means into leaves of about
//! `1 / head_ratio` points; sibling nodes run in parallel.

use super::SpannParams;
use crate::distance::l2_squared;
pub(crate) use crate::rng::Rng;
use rayon::prelude::*;

/// Largest k of a final (leaf-producing) k-means.
const MAX_FINAL_K: usize = 64;

/// A cluster: its centroid and the indices (into the node's point list) of
/// its members.
pub(crate) struct Cluster {
    pub centroid: Vec<f32>,
    pub members: Vec<u32>,
}

fn row(data: &[f32], dim: usize, i: u32) -> &[f32] {
    &data[i as usize * dim..(i as usize + 1) * dim]
}

fn nearest_penalized(v: &[f32], cents: &[f32], dim: usize, pen: &[f32]) -> (usize, f32) {
    let mut best = (0, f32::INFINITY);
    for (c, cv) in cents.chunks_exact(dim).enumerate() {
        let d = l2_squared(v, cv);
        let cost = d + pen[c];
        if cost < best.1 {
            best = (c, cost);
        }
    }
    best
}

/// Balanced k-means of the points `idx` of `data` into at most `k` non-empty
/// clusters.
pub(crate) fn kmeans(
    data: &[f32],
    dim: usize,
    idx: &[u32],
    k: usize,
    p: &SpannParams,
    rng: &mut Rng,
) -> Vec<Cluster> {
    let n = idx.len();
    let k = k.clamp(1, n.max(1));
    if n == 0 {
        return Vec::new();
    }
    // training sample
    let cap = k * p.sample_per_centroid.max(4);
    let sample: Vec<u32> = if n > cap {
        let mut s = idx.to_vec();
        for i in 0..cap {
            let j = i + rng.below(n - i);
            s.swap(i, j);
        }
        s.truncate(cap);
        s
    } else {
        idx.to_vec()
    };
    // init: distinct random sample points
    let mut cents = Vec::with_capacity(k * dim);
    {
        let mut order: Vec<usize> = (0..sample.len()).collect();
        for i in 0..k {
            let j = i + rng.below(order.len() - i);
            order.swap(i, j);
            cents.extend_from_slice(row(data, dim, sample[order[i]]));
        }
    }
    let avg = sample.len() as f32 / k as f32;
    let mut counts = vec![0f32; k];
    let mut lambda = 0f32;
    for _ in 0..p.kmeans_iters.max(1) {
        let pen: Vec<f32> = counts.iter().map(|c| lambda * c / avg).collect();
        let assign: Vec<(usize, f32)> = sample
            .par_iter()
            .map(|&i| {
                let (c, cost) = nearest_penalized(row(data, dim, i), &cents, dim, &pen);
                (c, cost - pen[c])
            })
            .collect();
        let mut sums = vec![0f64; k * dim];
        let mut cnt = vec![0usize; k];
        let mut dsum = 0f64;
        for (&i, &(c, d)) in sample.iter().zip(&assign) {
            cnt[c] += 1;
            dsum += d as f64;
            for (s, x) in sums[c * dim..(c + 1) * dim]
                .iter_mut()
                .zip(row(data, dim, i))
            {
                *s += *x as f64;
            }
        }
        for c in 0..k {
            if cnt[c] > 0 {
                for d in 0..dim {
                    cents[c * dim + d] = (sums[c * dim + d] / cnt[c] as f64) as f32;
                }
            } else {
                // re-seed an empty cluster next to a point of the largest one
                let big = (0..k).max_by_key(|&j| cnt[j]).unwrap();
                let members: Vec<u32> = sample
                    .iter()
                    .zip(&assign)
                    .filter(|(_, a)| a.0 == big)
                    .map(|(&i, _)| i)
                    .collect();
                let pick = members[rng.below(members.len())];
                let src = row(data, dim, pick).to_vec();
                for d in 0..dim {
                    cents[c * dim + d] = src[d] + 1e-4 * (rng.below(1000) as f32 / 1000.0 - 0.5);
                }
            }
        }
        counts = cnt.iter().map(|&c| c as f32).collect();
        lambda = p.balance * (dsum / sample.len() as f64) as f32;
    }
    // final assignment of every point, with the training sizes scaled up
    let scale = n as f32 / sample.len() as f32;
    let avg_n = n as f32 / k as f32;
    let pen: Vec<f32> = counts.iter().map(|c| lambda * c * scale / avg_n).collect();
    let assign: Vec<usize> = idx
        .par_iter()
        .map(|&i| nearest_penalized(row(data, dim, i), &cents, dim, &pen).0)
        .collect();
    let mut members = vec![Vec::new(); k];
    for (pos, &c) in assign.iter().enumerate() {
        members[c].push(pos as u32);
    }
    let mut out = Vec::with_capacity(k);
    for (c, m) in members.into_iter().enumerate() {
        if m.is_empty() {
            continue;
        }
        // centroid of the final members
        let mut s = vec![0f64; dim];
        for &pos in &m {
            for (a, x) in s.iter_mut().zip(row(data, dim, idx[pos as usize])) {
                *a += *x as f64;
            }
        }
        let centroid = s.iter().map(|x| (*x / m.len() as f64) as f32).collect();
        let _ = c;
        out.push(Cluster {
            centroid,
            members: m,
        });
    }
    out
}

/// Hierarchical balanced k-means of the points `idx` into clusters of about
/// `leaf` points each. Returns the leaves with members as indices into `data`.
pub(crate) fn hierarchical(
    data: &[f32],
    dim: usize,
    idx: Vec<u32>,
    leaf: f32,
    p: &SpannParams,
    seed: u64,
    progress: &(dyn Fn(usize) + Sync),
) -> Vec<Cluster> {
    let m = idx.len();
    if m == 0 {
        return Vec::new();
    }
    let need = ((m as f32 / leaf).ceil() as usize).max(1);
    let mut rng = Rng::new(seed);
    if need == 1 {
        let mut s = vec![0f64; dim];
        for &i in &idx {
            for (a, x) in s.iter_mut().zip(row(data, dim, i)) {
                *a += *x as f64;
            }
        }
        progress(m);
        return vec![Cluster {
            centroid: s.iter().map(|x| (*x / m as f64) as f32).collect(),
            members: idx,
        }];
    }
    if need <= MAX_FINAL_K {
        let cl = kmeans(data, dim, &idx, need, p, &mut rng);
        progress(m);
        return cl
            .into_iter()
            .map(|c| Cluster {
                centroid: c.centroid,
                members: c.members.iter().map(|&pos| idx[pos as usize]).collect(),
            })
            .collect();
    }
    let k = p.branch.clamp(2, need);
    let children = kmeans(data, dim, &idx, k, p, &mut rng);
    let groups: Vec<Vec<u32>> = children
        .into_iter()
        .map(|c| c.members.iter().map(|&pos| idx[pos as usize]).collect())
        .collect();
    if groups.len() == 1 {
        // clustering could not separate the points (duplicates): cut evenly
        let g = &groups[0];
        let step = leaf.ceil().max(1.0) as usize;
        return g
            .chunks(step)
            .flat_map(|ch| hierarchical(data, dim, ch.to_vec(), f32::INFINITY, p, seed, progress))
            .collect();
    }
    groups
        .into_par_iter()
        .enumerate()
        .map(|(i, g)| {
            hierarchical(
                data,
                dim,
                g,
                leaf,
                p,
                seed.wrapping_mul(31).wrapping_add(i as u64 + 1),
                progress,
            )
        })
        .flatten()
        .collect()
}

/// Pick up to `max` heads from `cands` (head ids with their distance to the
/// vector, nearest first) by the RNG rule: skip a candidate `c` when an
/// already chosen head `s` satisfies `dist(c, s) * rng_factor <= dist(x, c)`.
pub(crate) fn rng_select(
    cands: &[(f32, u32)],
    max: usize,
    rng_factor: f32,
    head_dist: impl Fn(u32, u32) -> f32,
) -> Vec<(f32, u32)> {
    // `max` can come from a damaged meta file: never reserve past the candidates
    let mut chosen: Vec<(f32, u32)> = Vec::with_capacity(max.min(cands.len()));
    for &(d, c) in cands {
        if chosen.len() >= max {
            break;
        }
        if chosen
            .iter()
            .all(|&(_, s)| head_dist(c, s) * rng_factor > d)
        {
            chosen.push((d, c));
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs(n: usize, dim: usize, centers: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        let cs: Vec<f32> = (0..centers * dim)
            .map(|_| (r.below(2000) as f32 / 100.0) - 10.0)
            .collect();
        let mut out = Vec::with_capacity(n * dim);
        for i in 0..n {
            let c = i % centers;
            for d in 0..dim {
                out.push(cs[c * dim + d] + r.below(1000) as f32 / 1000.0 - 0.5);
            }
        }
        out
    }

    #[test]
    fn hierarchical_covers_every_point_once_with_balanced_leaves() {
        let (n, dim) = (5000, 8);
        let data = blobs(n, dim, 7, 3);
        let p = SpannParams::default();
        let leaves = hierarchical(&data, dim, (0..n as u32).collect(), 10.0, &p, 1, &|_| {});
        let mut seen = vec![0u8; n];
        for l in &leaves {
            for &m in &l.members {
                seen[m as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&s| s == 1));
        assert!(
            leaves.len() >= 300 && leaves.len() <= 700,
            "{}",
            leaves.len()
        );
        let max = leaves.iter().map(|l| l.members.len()).max().unwrap();
        assert!(max <= 60, "largest leaf {max}");
    }

    #[test]
    fn rng_rule_skips_heads_behind_a_chosen_one() {
        // heads on a line at 1, 2, 10; the vector at 0
        let pos = [1.0f32, 2.0, 10.0, -1.0];
        let cands = [(1.0, 0u32), (1.0, 3), (2.0, 1), (10.0, 2)];
        let got = rng_select(&cands, 8, 1.0, |a, b| {
            (pos[a as usize] - pos[b as usize]).abs()
        });
        let ids: Vec<u32> = got.iter().map(|c| c.1).collect();
        assert_eq!(ids, vec![0, 3], "2 and 10 are behind head 1");
        let got = rng_select(&cands, 1, 1.0, |_, _| 100.0);
        assert_eq!(got.len(), 1);
    }
}

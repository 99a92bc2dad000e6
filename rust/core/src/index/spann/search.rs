//! Search: nearest heads through the coarse level, query-aware pruning,
//! posting scan with the int8 kernel, dedup, exact rerank, top-k.
//!
//! The coarse level groups the heads into lists of about `coarse_leaf`
//! heads (balanced hierarchical k-means over the heads); a query finds its
//! `coarse_probe` nearest list centroids (on a large index, prefiltered by
//! 1-bit codes), then scores the heads of those lists. This
//! is an exact SIMD scan over a few percent of the heads in place of SPTAG's
//! graph over heads: cheaper to build and to keep up to date under splits.

use super::bits::{self, QueryBits};
use super::builder;
use super::posting::{PostingData, QueryCodes};
use super::{LastSearch, SearchParams, SpannIndex, SpannParams};
use crate::distance::{self, Metric};
use crate::error::{Error, Result};
use crate::index::IdFilter;
use crate::storage::posting::PAGE;
use crate::topk::{Hit, TopK};
use rayon::prelude::*;
use std::borrow::Cow;
use std::sync::OnceLock;

/// Threads that wait on O_DIRECT reads (they block on the device, not the
/// CPU, so there are more of them than cores).
const IO_THREADS: usize = 32;

/// Above this many coarse lists the coarse scan is prefiltered by 1-bit
/// codes (see [`SpannIndex::probe_coarse`]); below it, all are scored.
pub(crate) const COARSE_PREFILTER_MIN: usize = 256;

fn io_pool() -> &'static rayon::ThreadPool {
    static P: OnceLock<rayon::ThreadPool> = OnceLock::new();
    P.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(IO_THREADS)
            .thread_name(|i| format!("spann-io-{i}"))
            .build()
            .expect("spann I/O thread pool")
    })
}

/// Whether the CPU has what [`SpannIndex::search_one_avx2`] enables.
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("bmi1")
            && std::is_x86_feature_detected!("bmi2")
            && std::is_x86_feature_detected!("lzcnt")
            && std::is_x86_feature_detected!("popcnt")
    })
}

/// Hint the CPU to load `bytes` into cache (no effect on other targets).
#[inline]
fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = data.as_ptr() as *const i8;
        let n = std::mem::size_of_val(data);
        let mut o = 0;
        while o < n {
            // SAFETY: prefetch never faults, and the address is inside `data`
            unsafe { _mm_prefetch(p.add(o), _MM_HINT_T0) };
            o += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Prefetch what the scan of `p` reads first for every entry.
#[inline]
fn prefetch_posting(p: &PostingData) {
    prefetch(&p.rows);
    prefetch(&p.bits);
    prefetch(&p.filt);
}

/// Build the coarse level over `heads`: (centroids, member lists).
pub(crate) fn build_coarse(
    heads: &[f32],
    dim: usize,
    p: &SpannParams,
) -> (Vec<f32>, Vec<Vec<u32>>) {
    let h = heads.len() / dim;
    let leaves = builder::hierarchical(
        heads,
        dim,
        (0..h as u32).collect(),
        p.coarse_leaf.max(1) as f32,
        p,
        p.seed ^ 0x00C0_A45E,
        &|_| {},
    );
    let mut cents = Vec::with_capacity(leaves.len() * dim);
    let mut lists = Vec::with_capacity(leaves.len());
    for l in leaves {
        cents.extend_from_slice(&l.centroid);
        lists.push(l.members);
    }
    (cents, lists)
}

/// A sort key for an upper bound: higher bounds give smaller keys (f32's
/// total order, reversed), so ascending keys are descending bounds.
#[inline(always)]
fn bound_key(b: f32) -> u32 {
    let x = b.to_bits();
    // total order as unsigned: flip all bits of negatives, the sign of the rest
    let ordered = if x >> 31 == 1 { !x } else { x | 0x8000_0000 };
    !ordered
}

/// The `n` best of candidates known at first only by an upper bound on
/// their score: `cands` holds (bound, key) for every candidate that can be
/// among them. Scores them with `score(key) -> (id, score, extra)` highest
/// bound first (ties by position in `cands`), until the bounds fall below
/// the n-th best score found; `warm(key)` is called a few candidates ahead
/// (to prefetch what `score` reads). Returns (id, score, extra), best first,
/// ties by the smaller id. The second phase of the coarse scan and of the
/// head ranking.
///
/// Only the order of the candidates actually scored matters, and the scan
/// usually stops after a few times `n` of them: the order is built a block
/// at a time (select the block's candidates, then sort only them), over
/// packed `u64` keys (bound key, position) rather than (f32, u64) pairs.
#[inline(always)]
fn best_by_bounds<T: Copy>(
    cands: Vec<(f32, u64)>,
    n: usize,
    warm: impl Fn(u64),
    mut score: impl FnMut(u64) -> (u32, f32, T),
) -> Vec<(u32, f32, T)> {
    const AHEAD: usize = 4;
    let mut order: Vec<u64> = cands
        .iter()
        .enumerate()
        .map(|(j, c)| (bound_key(c.0) as u64) << 32 | j as u64)
        .collect();
    let len = order.len();
    let block = (2 * n).max(64);
    // order[..sorted] is in final order; extend it by one block when the
    // scan (or its look-ahead) reaches its end
    let mut sorted = 0;
    let extend = |order: &mut Vec<u64>, sorted: &mut usize| {
        let end = (*sorted + block).min(len);
        let rest = &mut order[*sorted..];
        if end < len {
            rest.select_nth_unstable(end - *sorted - 1);
        }
        rest[..end - *sorted].sort_unstable();
        *sorted = end;
    };
    let at = |order: &Vec<u64>, j: usize| cands[(order[j] & 0xFFFF_FFFF) as usize];
    if len > 0 {
        extend(&mut order, &mut sorted);
    }
    for j in 0..AHEAD.min(sorted) {
        warm(at(&order, j).1);
    }
    let mut top = TopK::new(n);
    // the extras of the hits pushed: the TopK id is the caller's id in the
    // high half (ties still break by it) and the index here below (n can
    // come from parameters read from disk: a bounded reserve)
    let mut extra: Vec<T> = Vec::with_capacity(n.min(1024));
    let mut thr = top.threshold();
    for j in 0..len {
        if j + AHEAD >= sorted && sorted < len {
            extend(&mut order, &mut sorted);
        }
        let x = at(&order, j);
        if x.0 < thr {
            break;
        }
        if j + AHEAD < sorted {
            warm(at(&order, j + AHEAD).1);
        }
        let (id, s, t) = score(x.1);
        if s >= thr {
            top.push((id as u64) << 32 | extra.len() as u64, s);
            extra.push(t);
            thr = top.threshold();
        }
    }
    top.into_sorted()
        .into_iter()
        .map(|h| {
            (
                (h.id >> 32) as u32,
                h.score,
                extra[(h.id & 0xFFFF_FFFF) as usize],
            )
        })
        .collect()
}

impl SpannIndex {
    /// Whether reads go to the device (O_DIRECT) and so are issued in parallel.
    fn parallel_io(&self) -> bool {
        self.pfile.as_ref().is_some_and(|f| f.is_direct())
    }

    /// The `n` nearest live heads of `q` as (distance, head), nearest first,
    /// scanning the heads of the `coarse_probe` nearest coarse lists.
    pub(crate) fn nearest_heads(
        &self,
        q: &[f32],
        n: usize,
        coarse_probe: usize,
    ) -> Vec<(f32, u32)> {
        let dim = self.dim;
        let lists = &self.heads.lists;
        let mut ctop = TopK::new(coarse_probe.max(1));
        for (c, cv) in self.heads.coarse.chunks_exact(dim).enumerate() {
            if !lists[c].is_empty() {
                ctop.push(c as u64, -distance::l2_squared(q, cv));
            }
        }
        let mut top = TopK::new(n);
        for hit in ctop.into_sorted() {
            for &h in &lists[hit.id as usize] {
                if self.heads.alive[h as usize] {
                    top.push(h as u64, -self.dist(q, self.head(h)));
                }
            }
        }
        top.into_sorted()
            .into_iter()
            .map(|h| (-h.score, h.id as u32))
            .collect()
    }

    /// The `n` nearest non-empty coarse lists of the prepared query `q` by
    /// their centroids' int8 codes, nearest first, as (squared distance,
    /// list, `<q, C>`).
    ///
    /// With `qb` and more than [`COARSE_PREFILTER_MIN`] lists, in two phases
    /// as for the heads (see [`SpannIndex::nearest_heads_coded`]): the 1-bit
    /// estimate of every centroid, relative to the centroids' mean, with
    /// `filter` error bounds either side; then the int8 distances of the
    /// centroids whose lower bound reaches the n-th best upper bound, lowest
    /// bound first, until the bounds pass the n-th best distance found. The
    /// answer is the exact int8 one as far as the bounds hold; at 1M vectors
    /// (886 lists, coarse_probe 36) it int8-scores ~57 centroids and reads
    /// about a quarter of the bytes of a full int8 scan.
    #[inline(always)]
    pub(crate) fn probe_coarse(
        &self,
        q: &[f32],
        qc: &QueryCodes,
        qb: Option<&QueryBits>,
        filter: f32,
        n: usize,
    ) -> Vec<(f32, u32, f32)> {
        let dim = self.dim;
        let lists = &self.heads.lists;
        let qnorm = qc.qnorm();
        let nc = lists.len();
        // (upper bound of -distance, list) of the lists that can be among
        // the n nearest; without the prefilter, every non-empty list
        let cands: Vec<(f32, u64)> = match qb {
            Some(qb) if nc > COARSE_PREFILTER_MIN && self.heads.cfilt.len() == nc => {
                let nb = bits::code_bytes(dim);
                let mut sdot = vec![0f32; nc];
                qb.dot_signs_all(&self.heads.cbits, nb, &mut sdot);
                let m = &self.heads.cmean;
                let qm = distance::dot(q, m);
                let yperp = (qnorm - 2.0 * qm + distance::dot(m, m)).max(0.0).sqrt();
                // a distance is |q|^2 - 2 <q, C> + |C|^2: twice the error of
                // the inner product
                let w = 2.0 * filter * yperp;
                // (lower bound, list) and the upper bounds of the non-empty lists
                let mut lo: Vec<(f32, u64)> = Vec::with_capacity(nc);
                let mut hi: Vec<f32> = Vec::with_capacity(nc);
                for (c, (&[f, k, e], &sd)) in self.heads.cfilt.iter().zip(&sdot).enumerate() {
                    if lists[c].is_empty() {
                        continue;
                    }
                    let est = qnorm - 2.0 * (qm + f * sd + k) + self.heads.caux[c];
                    lo.push((est - w * e, c as u64));
                    hi.push(est + w * e);
                }
                // the n-th smallest upper bound: no list beyond it can be
                // among the n nearest
                let thr0 = if hi.len() > n {
                    *hi.select_nth_unstable_by(n - 1, |a, b| a.total_cmp(b)).1
                } else {
                    f32::INFINITY
                };
                lo.into_iter()
                    .filter(|x| x.0 <= thr0)
                    .map(|(l, c)| (-l, c))
                    .collect()
            }
            _ => (0..nc as u64)
                .filter(|&c| !lists[c as usize].is_empty())
                .map(|c| (f32::INFINITY, c))
                .collect(),
        };
        let code = |c: u64| &self.heads.ccodes[c as usize * dim..(c as usize + 1) * dim];
        best_by_bounds(
            cands,
            n,
            |c| prefetch(code(c)),
            |c| {
                let ip = qc.ip_code(code(c));
                let d = qnorm - 2.0 * ip + self.heads.caux[c as usize];
                (c as u32, -d, ip)
            },
        )
        .into_iter()
        .map(|(c, s, ip)| (-s, c, ip))
        .collect()
    }

    /// Like [`SpannIndex::nearest_heads`] but scoring heads by their int8
    /// codes against the prepared query (the query-time path). Each head
    /// comes with its code's inner product with the query and squared
    /// distance to it, `(distance, head, <q, c>, |q - c|^2)`, so the posting
    /// scan need not read the head's floats.
    ///
    /// With `qb`, in two phases: first the 1-bit estimate of every head of
    /// the probed lists (relative to its coarse list's centroid, see
    /// [`bits`]) with `filter` error bounds either side; then the int8 score
    /// of the heads whose upper bound reaches the n-th best lower bound among
    /// the nearest lists' first heads (no more than the n-th best overall:
    /// the n best heads all reach it, as far as the bounds hold), highest upper bound
    /// first, until the upper bounds fall below the n-th best score found.
    /// Scoring in that order, with the codes asked for a few heads ahead,
    /// scores about half as many heads as testing each list's heads in turn
    /// against the running n-th best score.
    #[inline(always)]
    pub(crate) fn nearest_heads_coded(
        &self,
        q: &[f32],
        qc: &QueryCodes,
        qb: Option<&QueryBits>,
        filter: f32,
        n: usize,
        coarse_probe: usize,
    ) -> Vec<(f32, u32, f32, f32)> {
        let dim = self.dim;
        let nb = bits::code_bytes(dim);
        let lists = &self.heads.lists;
        let qnorm = qc.qnorm();
        let probed = self.probe_coarse(q, qc, qb, filter, coarse_probe.max(1));
        // head distances: 1 - cos for cosine, squared L2 otherwise
        let l2 = self.metric != Metric::Cosine;
        // phase 1: upper bounds in `ub`, lower ones in `lb`, every head of
        // the probed lists in list order (without `qb`, every head gets
        // +inf: all are scored)
        let total: usize = probed.iter().map(|x| lists[x.1 as usize].len()).sum();
        let mut ub = vec![0f32; total];
        let mut lb = vec![0f32; total];
        let longest = probed.iter().map(|x| lists[x.1 as usize].len()).max();
        let mut sdot = vec![0f32; longest.unwrap_or(0)];
        let mut at = 0;
        for (j, &(cd, c, qcv)) in probed.iter().enumerate() {
            let c = c as usize;
            let lc = &self.heads.lcodes[c];
            let m = lists[c].len();
            let (u, l) = (&mut ub[at..at + m], &mut lb[at..at + m]);
            at += m;
            match qb {
                Some(qb) => {
                    if let Some(next) = probed.get(j + 1) {
                        let nc = &self.heads.lcodes[next.1 as usize];
                        prefetch(&nc.bits);
                        prefetch(&nc.f);
                        prefetch(&nc.k);
                        prefetch(&nc.e);
                    }
                    let yperp = cd.max(0.0).sqrt();
                    let w = filter * yperp * if l2 { 2.0 } else { 1.0 };
                    let sd = &mut sdot[..m];
                    qb.dot_signs_all(&lc.bits, nb, sd);
                    let (f, kk, e) = (&lc.f[..m], &lc.k[..m], &lc.e[..m]);
                    // one array per operand: this vectorises
                    if l2 {
                        let a = &lc.aux[..m];
                        for i in 0..m {
                            let est = -(qnorm - 2.0 * (qcv + f[i] * sd[i] + kk[i]) + a[i]);
                            u[i] = est + w * e[i];
                            l[i] = est - w * e[i];
                        }
                    } else {
                        for i in 0..m {
                            let est = qcv + f[i] * sd[i] + kk[i] - 1.0;
                            u[i] = est + w * e[i];
                            l[i] = est - w * e[i];
                        }
                    }
                }
                None => {
                    u.fill(f32::INFINITY);
                    l.fill(f32::INFINITY);
                }
            }
            // lists hold live heads only (a head leaves its lists when it
            // dies; opening rejects a file that says otherwise)
            debug_assert!(lists[c].iter().all(|&h| self.heads.alive[h as usize]));
        }
        // a lower bound of the n-th best lower bound: the n-th best of a
        // subset is one. The nearest lists' heads (the first `SUBSET * n`)
        // hold most of the n best, and selecting among them costs a
        // fraction of selecting among all
        const SUBSET: usize = 4;
        let thr0 = if n > 0 && lb.len() >= n {
            let mut sub = lb[..lb.len().min(SUBSET * n)].to_vec();
            *sub.select_nth_unstable_by(n - 1, |a, b| b.total_cmp(a)).1
        } else {
            f32::NEG_INFINITY
        };
        // (upper bound, list << 32 | index in list) of the heads that reach it
        let mut cands: Vec<(f32, u64)> = Vec::with_capacity(4 * n.min(1024));
        let mut at = 0;
        for &(_, c, _) in &probed {
            let m = lists[c as usize].len();
            for (i, &u) in ub[at..at + m].iter().enumerate() {
                if u >= thr0 && u > f32::NEG_INFINITY {
                    cands.push((u, (c as u64) << 32 | i as u64));
                }
            }
            at += m;
        }
        // phase 2: the int8 scores, each head with (<q, c>, |q - c|^2)
        let code_of = |key: u64| {
            let i = (key & 0xFFFF_FFFF) as usize;
            &self.heads.lcodes[(key >> 32) as usize].codes[i * dim..(i + 1) * dim]
        };
        best_by_bounds(
            cands,
            n,
            |key| prefetch(code_of(key)),
            |key| {
                let (c, i) = ((key >> 32) as usize, (key & 0xFFFF_FFFF) as usize);
                let aux = self.heads.lcodes[c].aux[i];
                let ip = qc.ip_code(code_of(key));
                let s = -qc.dist_of_ip(ip, aux);
                (lists[c][i], s, (ip, (qnorm - 2.0 * ip + aux).max(0.0)))
            },
        )
        .into_iter()
        .map(|(h, s, (ip, y2))| (-s, h, ip, y2))
        .collect()
    }

    /// Search with raw queries: checks the dimension before any I/O,
    /// normalises for cosine, then runs [`SpannIndex::search_prepared`].
    pub fn search(
        &self,
        queries: &[f32],
        k: usize,
        sp: &SearchParams,
        filter: Option<&IdFilter>,
    ) -> Result<Vec<Vec<Hit>>> {
        if !queries.len().is_multiple_of(self.dim) {
            return Err(Error::DimensionMismatch {
                expected: self.dim,
                got: queries.len() % self.dim,
            });
        }
        let q = self.prepare(queries)?;
        self.search_prepared(&q, k, sp, filter)
    }

    /// Search prepared queries (row-major); hits carry internal similarities
    /// (see [`Metric::user_score`]).
    pub fn search_prepared(
        &self,
        queries: &[f32],
        k: usize,
        sp: &SearchParams,
        filter: Option<&IdFilter>,
    ) -> Result<Vec<Vec<Hit>>> {
        let m = queries.len() / self.dim;
        let res: Vec<(Vec<Hit>, LastSearch)> = queries
            .par_chunks(self.dim)
            .map(|q| self.search_one(q, k, sp, filter))
            .collect::<Result<_>>()?;
        let mut last = LastSearch {
            queries: m as u64,
            ..LastSearch::default()
        };
        let mut out = Vec::with_capacity(m);
        for (hits, l) in res {
            last.postings += l.postings;
            last.bytes += l.bytes;
            out.push(hits);
        }
        *self.last.lock().unwrap() = last;
        Ok(out)
    }

    pub(crate) fn search_one(
        &self,
        q: &[f32],
        k: usize,
        sp: &SearchParams,
        filter: Option<&IdFilter>,
    ) -> Result<(Vec<Hit>, LastSearch)> {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has the features the function enables
            return unsafe { self.search_one_avx2(q, k, sp, filter) };
        }
        self.search_one_body(q, k, sp, filter)
    }

    /// [`SpannIndex::search_one`] compiled for AVX2 and FMA: the wheel
    /// targets baseline x86-64 (SSE2), and the query's scalar loops (the
    /// 1-bit bound tests over ~10,000 heads and entries per query at 1M)
    /// vectorise twice as wide. The same operations in the same order, so
    /// the same answers.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
    unsafe fn search_one_avx2(
        &self,
        q: &[f32],
        k: usize,
        sp: &SearchParams,
        filter: Option<&IdFilter>,
    ) -> Result<(Vec<Hit>, LastSearch)> {
        self.search_one_body(q, k, sp, filter)
    }

    #[inline(always)]
    pub(crate) fn search_one_body(
        &self,
        q: &[f32],
        k: usize,
        sp: &SearchParams,
        filter: Option<&IdFilter>,
    ) -> Result<(Vec<Hit>, LastSearch)> {
        let mut stats = LastSearch {
            queries: 1,
            ..LastSearch::default()
        };
        if k == 0 || self.row_of.is_empty() {
            return Ok((Vec::new(), stats));
        }
        let qc = QueryCodes::new(q, &self.quant, self.metric);
        let qb = sp.filter.is_finite().then(|| QueryBits::new(&self.rot, q));
        let heads = self.nearest_heads_coded(
            q,
            &qc,
            qb.as_ref(),
            sp.filter,
            sp.nprobe.max(1),
            sp.coarse_probe,
        );
        let Some(&(d0, ..)) = heads.first() else {
            return Ok((Vec::new(), stats));
        };
        let limit = if self.metric == Metric::Ip {
            f32::INFINITY
        } else {
            (1.0 + sp.epsilon) * d0.max(1e-6)
        };
        let near = heads.iter().take_while(|x| x.0 <= limit).count();
        let sel: Vec<u32> = heads[..near].iter().map(|x| x.1).collect();
        // with O_DIRECT every read waits on the device: issue them together
        // on the I/O pool (results are consumed in head order, so the answer
        // is the same as reading one by one)
        let parallel = self.parallel_io();
        let fetched: Vec<Option<PostingData>> = if parallel {
            io_pool().install(|| {
                sel.par_iter()
                    .map(|&h| {
                        if self.mem[h as usize].is_some() {
                            Ok(None)
                        } else {
                            self.read_posting(h).map(Some)
                        }
                    })
                    .collect::<Result<_>>()
            })?
        } else {
            Vec::new()
        };
        let mut seen = vec![0u64; self.ids.len().div_ceil(64)];
        let mut cand = TopK::new(sp.rerank.max(k));
        let dim = self.dim;
        let nb = bits::code_bytes(dim);
        let qnorm = distance::dot(q, q);
        let l2 = self.metric == Metric::L2;
        let mut pass: Vec<u32> = Vec::with_capacity(256);
        let mut sdot: Vec<f32> = Vec::with_capacity(256);
        let mut scan = |h: u32, hq: (f32, f32), p: &PostingData, stats: &mut LastSearch| {
            stats.postings += 1;
            if self.mem[h as usize].is_none() {
                stats.bytes += self.slots[h as usize].pages as u64 * PAGE as u64;
            }
            // the 1-bit estimate: <q, x> ~ <q, c> + f <s, Pq> + k, off by
            // at most ~ e |q - c| (see `bits`); <q, c> and |q - c| come from
            // the head's int8 code (far finer than that bound)
            let filt = match &qb {
                Some(qb) if p.has_filter(dim) => {
                    let (qc_, y2) = hq;
                    let yperp = y2.sqrt();
                    let w = sp.filter * yperp * if l2 { 2.0 } else { 1.0 };
                    Some((qb, qc_, w))
                }
                _ => None,
            };
            // pass 1: the 1-bit estimate of every entry not seen yet; it
            // reads only this posting's own bytes (an entry it skips is not
            // marked seen, so a copy in a later posting gets its own test)
            let thr0 = cand.threshold();
            pass.clear();
            if let Some((qb, _, _)) = filt {
                sdot.resize(p.len(), 0.0);
                qb.dot_signs_all(&p.bits, nb, &mut sdot);
            }
            if let (Some((_, qc_, w)), false) = (filt, l2) {
                // cosine / inner product: the bound test of 64 entries at a
                // time first (no branches, no rows read), then the row of
                // each survivor checked against `seen`
                let n = p.len();
                let mut i0 = 0;
                while i0 < n {
                    let m = (n - i0).min(64);
                    let fs = p.filt[i0..i0 + m].iter().zip(&sdot[i0..i0 + m]);
                    let mut keep = 0u64;
                    for (b, (&[f, kk, e], &sd)) in fs.enumerate() {
                        // the same test as below: kept unless under thr0
                        let skip = (qc_ + f * sd + kk) + w * e < thr0;
                        keep |= (!skip as u64) << b;
                    }
                    while keep != 0 {
                        let i = i0 + keep.trailing_zeros() as usize;
                        keep &= keep - 1;
                        let r = p.rows[i] as usize;
                        if seen[r / 64] & (1u64 << (r % 64)) != 0 {
                            continue;
                        }
                        prefetch(&p.codes[i * dim..(i + 1) * dim]);
                        pass.push(i as u32);
                    }
                    i0 += m;
                }
            } else {
                // indexes rows, filt, aux, codes and the estimates together
                #[allow(clippy::needless_range_loop)]
                for i in 0..p.len() {
                    let r = p.rows[i] as usize;
                    if seen[r / 64] & (1u64 << (r % 64)) != 0 {
                        continue;
                    }
                    if let Some((_, qc_, w)) = filt {
                        let [f, kk, e] = p.filt[i];
                        let ip = qc_ + f * sdot[i] + kk;
                        let est = if l2 {
                            -(qnorm - 2.0 * ip + p.aux[i])
                        } else {
                            ip
                        };
                        if est + w * e < thr0 {
                            continue;
                        }
                        prefetch(&p.codes[i * dim..(i + 1) * dim]);
                    }
                    pass.push(i as u32);
                }
            }
            // pass 2: the int8 score of the survivors; the row table (read
            // at random) is checked only for an entry that would enter the
            // candidates. One left out keeps a score below the threshold,
            // which only rises: a copy of it elsewhere cannot enter either.
            let mut thr = cand.threshold();
            for &i in pass.iter() {
                let i = i as usize;
                let s = qc.score(p, i);
                if s < thr {
                    continue;
                }
                let r = p.rows[i] as usize;
                let (w, b) = (r / 64, 1u64 << (r % 64));
                if seen[w] & b != 0 || !self.alive[r] || self.versions[r] != p.versions[i] {
                    continue;
                }
                seen[w] |= b;
                if let Some(f) = filter {
                    if !f(self.ids[r]) {
                        continue;
                    }
                }
                cand.push(r as u64, s);
                thr = cand.threshold();
            }
            cand.len()
        };
        let mut found = 0;
        if let Some(&n) = sel.get(1) {
            prefetch(std::slice::from_ref(&self.mem[n as usize]));
        }
        for (j, &h) in sel.iter().enumerate() {
            // a resident posting is a handful of short arrays somewhere in
            // RAM: ask for the next one's while this one is scanned, and for
            // the one after's descriptor (where those arrays are)
            if let Some(&n) = sel.get(j + 2) {
                prefetch(std::slice::from_ref(&self.mem[n as usize]));
            }
            if let Some(Some(next)) = sel.get(j + 1).map(|&n| self.mem[n as usize].as_ref()) {
                prefetch_posting(next);
            }
            let p = match fetched.get(j) {
                Some(Some(p)) => Cow::Borrowed(p),
                _ => self.load_posting(h)?,
            };
            found = scan(h, (heads[j].2, heads[j].3), &p, &mut stats);
        }
        // Ratio pruning may stop too early: when the query *is* a head, d0 is
        // ~0 and only that head's posting passes. Read on, nearest first,
        // until k candidates are found or the probe list ends.
        for &(_, h, ip, y2) in &heads[near..] {
            if found >= k {
                break;
            }
            let p = self.load_posting(h)?;
            found = scan(h, (ip, y2), &p, &mut stats);
        }
        let mut top = TopK::new(k);
        let disk_rows = self.arena_first_row;
        let cands = cand.into_sorted();
        // the candidates' ids, read at random: one tight loop lets the
        // loads overlap
        let cids: Vec<u64> = cands.iter().map(|c| self.ids[c.id as usize]).collect();
        if disk_rows == 0 {
            // every row is in RAM: score the vectors in place (no copy),
            // asking for the next one while this one is scored
            let at = |r: usize| &self.arena[r * dim..(r + 1) * dim];
            for (j, c) in cands.iter().enumerate() {
                if let Some(n) = cands.get(j + 1) {
                    prefetch(at(n.id as usize));
                }
                top.push(cids[j], self.metric.similarity(q, at(c.id as usize)));
            }
            return Ok((top.into_sorted(), stats));
        }
        let mut vecs = vec![0f32; cands.len() * dim];
        if parallel {
            io_pool().install(|| {
                vecs.par_chunks_mut(dim)
                    .zip(cands.par_iter())
                    .try_for_each(|(out, c)| self.read_vector(c.id as u32, out))
            })?;
        } else {
            for (out, c) in vecs.chunks_exact_mut(dim).zip(&cands) {
                self.read_vector(c.id as u32, out)?;
            }
        }
        for ((v, c), &id) in vecs.chunks_exact(dim).zip(&cands).zip(&cids) {
            if (c.id as usize) < disk_rows {
                stats.bytes += (dim * 4 + 4) as u64;
            }
            top.push(id, self.metric.similarity(q, v));
        }
        Ok((top.into_sorted(), stats))
    }
}

#[cfg(test)]
mod tests {
    use super::{best_by_bounds, bound_key};
    use crate::rng::Rng;

    #[test]
    fn bound_keys_order_bounds_high_to_low() {
        let xs = [
            f32::INFINITY,
            3.5,
            1.0,
            0.0,
            -0.0,
            -1e-30,
            -2.0,
            f32::NEG_INFINITY,
        ];
        for w in xs.windows(2) {
            assert!(bound_key(w[0]) <= bound_key(w[1]), "{} vs {}", w[0], w[1]);
        }
        assert!(bound_key(1.0) < bound_key(0.5));
    }

    /// With every bound at or above its candidate's score, the answer is the
    /// exact `n` best (ties by the smaller id), whatever the number of
    /// candidates against the block size (one block, several, none).
    #[test]
    fn best_by_bounds_finds_the_exact_best() {
        let mut rng = Rng::new(7);
        for &(m, n) in &[(0, 5), (3, 5), (10, 10), (200, 8), (1000, 40), (5000, 3)] {
            // coarse scores (many ties) and loose bounds above them
            let scores: Vec<f32> = (0..m).map(|_| (rng.below(50) as f32) / 10.0).collect();
            let cands: Vec<(f32, u64)> = scores
                .iter()
                .enumerate()
                .map(|(i, &s)| (s + rng.next_f64() as f32 * 2.0, i as u64))
                .collect();
            let scored = std::cell::Cell::new(0usize);
            let got = best_by_bounds(
                cands,
                n,
                |_| {},
                |key| {
                    scored.set(scored.get() + 1);
                    (key as u32, scores[key as usize], key)
                },
            );
            let mut want: Vec<(u32, f32)> = scores
                .iter()
                .enumerate()
                .map(|(i, &s)| (i as u32, s))
                .collect();
            want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            want.truncate(n);
            let got_ids: Vec<(u32, f32)> = got.iter().map(|&(id, s, _)| (id, s)).collect();
            assert_eq!(got_ids, want, "m {m} n {n}");
            assert!(got.iter().all(|&(id, _, extra)| extra == id as u64));
            // the bounds cut the scan short where they can
            if m >= 1000 {
                assert!(scored.get() < m, "scored all {m}");
            }
        }
    }
}

//! In-place updates in the manner of SPFresh's LIRE protocol.
//!
//! - **Insert**: a new vector gets a new row and is appended (as an int8
//!   code) to the postings the RNG rule picks for it.
//! - **Delete**: a tombstone on the row; its entries are skipped by search
//!   and dropped by the next split or compaction.
//! - **Move**: bumping a row's version makes every entry written with the
//!   old version stale at once, so a vector is moved by bumping its version
//!   and appending it to its new postings; no posting is rewritten.
//! - **Split**: a posting longer than `posting_cap` is garbage-collected; if
//!   still too long it is cut in two by 2-means on the decoded codes, the
//!   old head takes one centroid and a new head the other. Only vectors that
//!   now break nearest-head assignment are reassigned: members of the split
//!   posting closer to a neighbouring head than to both new heads, and
//!   members of neighbouring postings closer to a new head than to their own.
//! - **Merge**: at compaction, a posting with fewer than `merge_below` live
//!   entries loses its head and its vectors are reassigned.
//! - **Compaction** rewrites the posting and vector files with only live
//!   data (rows renumbered densely), so disk use stays bounded under churn.
//!
//! Reassignment works on the stored codes, so it never reads the
//! full-precision vectors.

use super::builder::{self, Rng};
use super::posting::PostingData;
use super::{Mode, Slot, SpannIndex};
use crate::distance::{self, Metric};
use crate::error::{Error, Result};
use crate::storage::wal::WalOp;
use rayon::prelude::*;
use std::collections::{BTreeSet, HashMap, HashSet};

/// Neighbouring heads examined when a posting splits.
const SPLIT_NEIGHBOURS: usize = 8;
/// Most splits one update batch may trigger (guards against cascades).
const MAX_SPLITS_PER_BATCH: usize = 100_000;

/// A vector ready to append: its chosen heads, code and aux value.
type Prepared = (Vec<(f32, u32)>, Vec<i8>, f32);

/// What [`SpannIndex::compact`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CompactReport {
    pub disk_before: u64,
    pub disk_after: u64,
    pub entries_dropped: u64,
    pub merged: u64,
    pub split: u64,
    pub rows_dropped: u64,
}

impl SpannIndex {
    /// Insert vectors under new ids (raw vectors: checked and normalised).
    /// With a directory, durable when it returns (see [`super::log`]).
    pub fn add(&mut self, ids: &[u64], vectors: &[f32]) -> Result<()> {
        self.writable()?;
        for &id in ids {
            if self.row_of.contains_key(&id) {
                return Err(Error::DuplicateId(id));
            }
        }
        self.upsert(ids, vectors)
    }

    /// Insert vectors, replacing those of ids already present. With a
    /// directory, durable when it returns.
    pub fn upsert(&mut self, ids: &[u64], vectors: &[f32]) -> Result<()> {
        self.writable()?;
        if !vectors.len().is_multiple_of(self.dim) || vectors.len() / self.dim != ids.len() {
            if !vectors.len().is_multiple_of(self.dim) {
                return Err(Error::DimensionMismatch {
                    expected: self.dim,
                    got: vectors.len() % self.dim,
                });
            }
            return Err(Error::InvalidArgument(format!(
                "{} ids for {} vectors",
                ids.len(),
                vectors.len() / self.dim
            )));
        }
        let data = self.prepare(vectors)?;
        self.upsert_prepared(ids, data)
    }

    /// Upsert prepared vectors: check the batch, append it to the log (if
    /// the index has one), then apply it.
    pub(crate) fn upsert_prepared(&mut self, ids: &[u64], data: Vec<f32>) -> Result<()> {
        self.reload_heads()?;
        let dim = self.dim;
        if data.len() != ids.len() * dim {
            return Err(Error::InvalidArgument(format!(
                "{} ids for {} floats of dimension {dim}",
                ids.len(),
                data.len()
            )));
        }
        let mut batch = HashSet::with_capacity(ids.len());
        for &id in ids {
            if !batch.insert(id) {
                return Err(Error::DuplicateId(id));
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        if self.log.is_some() || self.read_only {
            let ops = super::log::put_ops(ids, &data, dim);
            self.log_ops(&ops)?;
        }
        self.apply_upsert(ids, data)
    }

    /// Apply a checked upsert (no logging): the common path of a new write
    /// and of replay, so replay rebuilds exactly what the writer had.
    pub(crate) fn apply_upsert(&mut self, ids: &[u64], data: Vec<f32>) -> Result<()> {
        let dim = self.dim;
        self.tombstone(ids);
        let probe = self.search_defaults().coarse_probe;
        let prepared: Vec<Prepared> = data
            .par_chunks(dim)
            .map(|v| {
                let mut code = vec![0i8; dim];
                let aux = self.quant.encode(v, &mut code);
                (self.choose_heads(v, probe), code, aux)
            })
            .collect();
        let mut over = BTreeSet::new();
        for (i, &id) in ids.iter().enumerate() {
            let r = self.ids.len() as u32;
            self.ids.push(id);
            self.versions.push(0);
            self.alive.push(true);
            self.row_of.insert(id, r);
            self.arena.extend_from_slice(&data[i * dim..(i + 1) * dim]);
            let (heads, code, aux) = &prepared[i];
            for &(_, h) in heads {
                let (b, f) = self.entry_filter(h, code);
                let p = self.posting_mut(h)?;
                p.push(r, 0, *aux, code, &b, f);
                if p.len() > self.params.posting_cap {
                    over.insert(h);
                }
            }
        }
        self.split_all(over)?;
        Ok(())
    }

    /// Delete `ids` (unknown ones are ignored); returns how many were
    /// present. With a directory, durable when it returns.
    pub fn delete(&mut self, ids: &[u64]) -> Result<usize> {
        self.writable()?;
        let live: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| self.row_of.contains_key(id))
            .collect();
        let ops: Vec<WalOp> = live
            .chunks(super::log::IDS_PER_FRAME)
            .map(|c| WalOp::Delete { ids: c.to_vec() })
            .collect();
        self.log_ops(&ops)?;
        Ok(self.tombstone(ids))
    }

    /// Tombstone `ids` (no logging); returns how many were present.
    pub(crate) fn tombstone(&mut self, ids: &[u64]) -> usize {
        let mut n = 0;
        for id in ids {
            if let Some(r) = self.row_of.remove(id) {
                self.alive[r as usize] = false;
                n += 1;
            }
        }
        n
    }

    /// `Err(ReadOnly)` for a handle opened read-only.
    /// Refuse a write on a read-only handle; on a writer that released its
    /// head vectors (see [`SpannIndex::heads_released`]), read them back
    /// from the metadata file first. Every write goes through here.
    pub(crate) fn writable(&mut self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        self.reload_heads()
    }

    /// Read a released writer's head vectors back from its metadata file,
    /// which holds exactly them: the writer released them only when its log
    /// replay moved no head, and no checkpoint can run before this.
    pub(crate) fn reload_heads(&mut self) -> Result<()> {
        if !self.heads_released {
            return Ok(());
        }
        self.heads.vecs = self.released_heads()?;
        self.heads_released = false;
        Ok(())
    }

    /// The resident, modifiable posting of `h` (read from disk if needed).
    pub(crate) fn posting_mut(&mut self, h: u32) -> Result<&mut PostingData> {
        let hu = h as usize;
        if self.mem[hu].is_none() {
            let p = self.read_posting(h)?;
            self.mem[hu] = Some(p);
        }
        self.dirty[hu] = true;
        Ok(self.mem[hu].as_mut().unwrap())
    }

    /// Drop entries of deleted rows, stale versions and repeated rows.
    fn gc_posting(&mut self, h: u32) -> Result<usize> {
        let dim = self.dim;
        let (alive, versions) = (&self.alive, &self.versions);
        let hu = h as usize;
        if self.mem[hu].is_none() {
            let p = self.read_posting(h)?;
            self.mem[hu] = Some(p);
        }
        let p = self.mem[hu].as_mut().unwrap();
        let before = p.len();
        let mut seen = HashSet::with_capacity(before);
        let (rows, vers) = (p.rows.clone(), p.versions.clone());
        p.retain_idx(dim, |i| {
            let r = rows[i] as usize;
            alive[r] && versions[r] == vers[i] && seen.insert(r)
        });
        let dropped = before - p.len();
        if dropped > 0 {
            self.dirty[hu] = true;
        }
        Ok(dropped)
    }

    fn split_all(&mut self, mut over: BTreeSet<u32>) -> Result<u64> {
        let mut n = 0u64;
        while let Some(h) = over.pop_first() {
            if n as usize >= MAX_SPLITS_PER_BATCH {
                break;
            }
            if !self.heads.alive[h as usize] {
                continue;
            }
            if self.split(h, &mut over)? {
                n += 1;
            }
        }
        Ok(n)
    }

    fn new_head(&mut self, v: &[f32]) -> u32 {
        let h = self.heads.alive.len() as u32;
        self.heads_moved = true;
        self.heads.vecs.extend_from_slice(v);
        self.heads.alive.push(true);
        self.encode_head(h);
        self.mem.push(Some(PostingData::default()));
        self.slots.push(Slot::default());
        self.dirty.push(true);
        // nearest coarse list
        let mut best = (0usize, f32::INFINITY);
        for (c, cv) in self.heads.coarse.chunks_exact(self.dim).enumerate() {
            let d = distance::l2_squared(v, cv);
            if d < best.1 {
                best = (c, d);
            }
        }
        if self.heads.lists.is_empty() {
            self.heads.coarse.extend_from_slice(v);
            self.heads.lists.push(Vec::new());
        }
        self.heads.lists[best.0].push(h);
        self.sync_list(best.0);
        h
    }

    fn kill_head(&mut self, h: u32) {
        let hu = h as usize;
        self.heads.alive[hu] = false;
        let mut touched = Vec::new();
        for (c, l) in self.heads.lists.iter_mut().enumerate() {
            let before = l.len();
            l.retain(|&x| x != h);
            if l.len() != before {
                touched.push(c);
            }
        }
        for c in touched {
            self.sync_list(c);
        }
        if self.slots[hu].pages > 0 {
            self.garbage_pages += self.slots[hu].pages as u64;
        }
        self.slots[hu] = Slot::default();
        self.mem[hu] = Some(PostingData::default());
        self.dirty[hu] = false;
    }

    /// Move row `r` (whose code and aux are given) to freshly chosen heads.
    fn reassign(&mut self, r: u32, code: &[i8], aux: f32, over: &mut BTreeSet<u32>) -> Result<()> {
        let mut v = vec![0f32; self.dim];
        self.quant.decode(code, &mut v);
        if self.metric == Metric::Cosine {
            let _ = distance::normalize(&mut v);
        }
        let heads = self.choose_heads(&v, self.search_defaults().coarse_probe);
        let ver = self.versions[r as usize].wrapping_add(1);
        self.versions[r as usize] = ver;
        for (_, h) in heads {
            let (b, f) = self.entry_filter(h, code);
            let p = self.posting_mut(h)?;
            p.push(r, ver, aux, code, &b, f);
            if p.len() > self.params.posting_cap {
                over.insert(h);
            }
        }
        Ok(())
    }

    fn decoded(&self, code: &[i8]) -> Vec<f32> {
        let mut v = vec![0f32; self.dim];
        self.quant.decode(code, &mut v);
        if self.metric == Metric::Cosine {
            let _ = distance::normalize(&mut v);
        }
        v
    }

    /// Split the posting of `h` if it is still oversized after garbage
    /// collection. Returns whether it split.
    fn split(&mut self, h: u32, over: &mut BTreeSet<u32>) -> Result<bool> {
        let dim = self.dim;
        self.gc_posting(h)?;
        let p = self.mem[h as usize].take().unwrap();
        if p.len() <= self.params.posting_cap {
            self.mem[h as usize] = Some(p);
            return Ok(false);
        }
        let n = p.len();
        let mut vs = Vec::with_capacity(n * dim);
        for i in 0..n {
            vs.extend(self.decoded(&p.codes[i * dim..(i + 1) * dim]));
        }
        let mut rng = Rng::new(self.params.seed ^ h as u64 ^ (self.heads.alive.len() as u64) << 20);
        let cl = builder::kmeans(
            &vs,
            dim,
            &(0..n as u32).collect::<Vec<_>>(),
            2,
            &self.params,
            &mut rng,
        );
        if cl.len() < 2 {
            // identical vectors cannot be separated: leave it long
            self.mem[h as usize] = Some(p);
            return Ok(false);
        }
        let old_head = self.head(h).to_vec();
        let mut cents: Vec<Vec<f32>> = cl.iter().map(|c| c.centroid.clone()).collect();
        if self.metric == Metric::Cosine {
            for c in cents.iter_mut() {
                let _ = distance::normalize(c);
            }
        }
        self.heads_moved = true;
        self.heads.vecs[h as usize * dim..(h as usize + 1) * dim].copy_from_slice(&cents[0]);
        self.encode_head(h);
        let h2 = self.new_head(&cents[1]);
        let mut side = vec![0u8; n];
        for &m in &cl[1].members {
            side[m as usize] = 1;
        }
        let mut a = PostingData::default();
        let mut b = PostingData::default();
        for (i, &sd) in side.iter().enumerate() {
            let t = if sd == 0 { &mut a } else { &mut b };
            t.push(
                p.rows[i],
                p.versions[i],
                p.aux[i],
                &p.codes[i * dim..(i + 1) * dim],
                &[],
                [0.0; 3],
            );
        }
        // the filter codes are relative to the head: both heads are new
        self.fill_filter(h, &mut a);
        self.fill_filter(h2, &mut b);
        self.mem[h as usize] = Some(a);
        self.mem[h2 as usize] = Some(b);
        self.dirty[h as usize] = true;
        self.dirty[h2 as usize] = true;

        // neighbours of the old head (excluding the two new ones)
        let neigh: Vec<u32> = self
            .nearest_heads(
                &old_head,
                SPLIT_NEIGHBOURS + 2,
                self.search_defaults().coarse_probe,
            )
            .into_iter()
            .map(|x| x.1)
            .filter(|&x| x != h && x != h2)
            .take(SPLIT_NEIGHBOURS)
            .collect();
        // 1. members of the split posting that now belong elsewhere
        let mut moves: Vec<(u32, Vec<i8>, f32)> = Vec::new();
        for i in 0..n {
            let v = &vs[i * dim..(i + 1) * dim];
            let own = self.dist(v, &cents[0]).min(self.dist(v, &cents[1]));
            if neigh.iter().any(|&g| self.dist(v, self.head(g)) < own) {
                moves.push((
                    p.rows[i],
                    p.codes[i * dim..(i + 1) * dim].to_vec(),
                    p.aux[i],
                ));
            }
        }
        // 2. members of neighbouring postings now closer to a new head
        for &g in &neigh {
            let q = self.load_posting(g)?.into_owned();
            let gv = self.head(g).to_vec();
            for i in 0..q.len() {
                let r = q.rows[i] as usize;
                if !self.alive[r] || self.versions[r] != q.versions[i] {
                    continue;
                }
                let v = self.decoded(&q.codes[i * dim..(i + 1) * dim]);
                let own = self.dist(&v, &gv);
                if self.dist(&v, &cents[0]) < own || self.dist(&v, &cents[1]) < own {
                    moves.push((
                        q.rows[i],
                        q.codes[i * dim..(i + 1) * dim].to_vec(),
                        q.aux[i],
                    ));
                }
            }
        }
        let mut moved = HashSet::new();
        for (r, code, aux) in moves {
            if moved.insert(r) {
                self.reassign(r, &code, aux, over)?;
            }
        }
        for x in [h, h2] {
            if self.mem[x as usize].as_ref().map_or(0, |p| p.len()) > self.params.posting_cap {
                over.insert(x);
            }
        }
        Ok(true)
    }

    /// Write modified postings, new vectors and the metadata to the index's
    /// directory. Modified postings are appended; the pages they replace
    /// become garbage until [`SpannIndex::compact`].
    ///
    /// The update log is rotated in the same commit (see [`super::log`]):
    /// once this returns, the operations it held are in the files and the
    /// next open replays nothing twice.
    pub fn flush(&mut self) -> Result<()> {
        self.writable()?;
        let Some(dir) = self.path.clone() else {
            return Err(Error::InvalidArgument(
                "index has no directory yet: call save(path) first".into(),
            ));
        };
        let dim = self.dim;
        for h in 0..self.heads.alive.len() {
            if !self.dirty[h] || !self.heads.alive[h] {
                continue;
            }
            let pf = self.pfile.as_mut().unwrap();
            let stream = self.mem[h]
                .as_ref()
                .unwrap()
                .encode(h as u32, dim, pf.has_filter());
            let (first, pages) = pf.append(&stream)?;
            let old = self.slots[h];
            self.garbage_pages += old.pages as u64;
            self.slots[h] = Slot {
                first_page: first,
                pages,
                len: self.mem[h].as_ref().unwrap().len() as u32,
            };
            self.dirty[h] = false;
        }
        let vf = self.vfile.as_mut().unwrap();
        let have = vf.rows() as usize;
        let total = self.ids.len();
        if total > have {
            let start = (have - self.arena_first_row) * dim;
            let end = (total - self.arena_first_row) * dim;
            vf.append(&self.arena[start..end])?;
        }
        self.pfile.as_ref().unwrap().sync()?;
        self.vfile.as_ref().unwrap().sync()?;
        let rotate = self.log.as_ref().is_none_or(|w| !w.is_empty());
        let next = if rotate {
            Some(super::next_number(self.log_seq, &dir)?)
        } else {
            None
        };
        self.commit_meta(&dir, next, None)?;
        if self.mode == Mode::Disk {
            self.evict();
        }
        Ok(())
    }

    /// Drop stale entries and deleted rows, merge undersized postings, split
    /// oversized ones, and rewrite the files of the index (as a new
    /// generation) with only live data. Needs every posting and live vector
    /// in RAM while it runs.
    pub fn compact(&mut self) -> Result<CompactReport> {
        // before any change: a read-only handle must not rearrange its
        // postings in RAM and only then fail to write them
        self.writable()?;
        let mut rep = CompactReport {
            disk_before: self.stats().disk_bytes,
            ..CompactReport::default()
        };
        let dim = self.dim;
        let nh = self.heads.alive.len();
        for h in 0..nh {
            if self.heads.alive[h] {
                rep.entries_dropped += self.gc_posting(h as u32)? as u64;
            }
        }
        // merge undersized postings
        let mut over = BTreeSet::new();
        let live_heads = self.heads.alive.iter().filter(|&&a| a).count();
        let mut remaining = live_heads;
        for h in 0..nh {
            if !self.heads.alive[h] || remaining <= 1 {
                continue;
            }
            let len = self.mem[h].as_ref().map_or(0, |p| p.len());
            if len >= self.params.merge_below {
                continue;
            }
            let p = self.mem[h].take().unwrap_or_default();
            self.kill_head(h as u32);
            remaining -= 1;
            rep.merged += 1;
            for i in 0..p.len() {
                let r = p.rows[i] as usize;
                if self.alive[r] && self.versions[r] == p.versions[i] {
                    let code = p.codes[i * dim..(i + 1) * dim].to_vec();
                    self.reassign(r as u32, &code, p.aux[i], &mut over)?;
                }
            }
        }
        for h in 0..self.heads.alive.len() {
            if self.heads.alive[h]
                && self.mem[h].as_ref().map_or(0, |p| p.len()) > self.params.posting_cap
            {
                over.insert(h as u32);
            }
        }
        rep.split = self.split_all(over)?;
        for h in 0..self.heads.alive.len() {
            if self.heads.alive[h] {
                rep.entries_dropped += self.gc_posting(h as u32)? as u64;
            }
        }
        // renumber rows densely
        let old_rows = self.ids.len();
        let mut new_of = vec![u32::MAX; old_rows];
        let mut ids = Vec::with_capacity(self.row_of.len());
        let mut arena = Vec::with_capacity(self.row_of.len() * dim);
        let mut buf = vec![0f32; dim];
        for (r, slot) in new_of.iter_mut().enumerate() {
            if self.alive[r] {
                *slot = ids.len() as u32;
                ids.push(self.ids[r]);
                self.read_vector(r as u32, &mut buf)?;
                arena.extend_from_slice(&buf);
            }
        }
        rep.rows_dropped = (old_rows - ids.len()) as u64;
        // renumber heads densely
        let mut head_new = vec![u32::MAX; self.heads.alive.len()];
        let mut hv = Vec::new();
        let mut mem = Vec::new();
        for (h, slot) in head_new.iter_mut().enumerate() {
            if !self.heads.alive[h] {
                continue;
            }
            *slot = mem.len() as u32;
            hv.extend_from_slice(self.head(h as u32));
            let mut p = self.mem[h].take().unwrap_or_default();
            for (r, v) in p.rows.iter_mut().zip(p.versions.iter_mut()) {
                *r = new_of[*r as usize];
                *v = 0;
            }
            mem.push(Some(p));
        }
        let lists: Vec<Vec<u32>> = self
            .heads
            .lists
            .iter()
            .map(|l| {
                l.iter()
                    .map(|&h| head_new[h as usize])
                    .filter(|&h| h != u32::MAX)
                    .collect()
            })
            .collect();
        let nh = mem.len();
        self.heads_moved = true;
        self.heads.vecs = hv;
        self.heads.alive = vec![true; nh];
        self.heads.lists = lists;
        self.encode_heads();
        self.mem = mem;
        self.slots = vec![Slot::default(); nh];
        self.dirty = vec![true; nh];
        self.row_of = ids
            .iter()
            .enumerate()
            .map(|(r, &id)| (id, r as u32))
            .collect::<HashMap<_, _>>();
        self.versions = vec![0; ids.len()];
        self.alive = vec![true; ids.len()];
        self.ids = ids;
        self.arena = arena;
        self.arena_first_row = 0;
        self.vfile = None;
        if let Some(dir) = self.path.clone() {
            self.save(&dir)?;
        }
        rep.disk_after = self.stats().disk_bytes;
        Ok(rep)
    }
}

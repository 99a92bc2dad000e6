//! SPANN: a memory/disk hybrid approximate nearest-neighbour index
//! (Chen et al., NeurIPS 2021) with in-place updates in the manner of
//! SPFresh (Xu et al., SOSP 2023).
//!
//! | part | where it lives | module |
//! |---|---|---|
//! | heads (5% of the points by default, centroids of balanced hierarchical k-means) and a coarse level over them | RAM | [`builder`], [`search`] |
//! | postings: for each head, int8 codes of the vectors assigned to it (up to `replicas` heads per vector, RNG rule) and 1-bit filter codes of their residuals | RAM (memory mode) or 4 KiB checksummed pages (disk mode) | [`posting`], [`bits`], [`crate::storage::posting`] |
//! | full-precision vectors, read only to rerank the final candidates | RAM or a checksummed record file | [`crate::storage::posting`] |
//! | row table: external id, version, tombstone | RAM | this module |
//!
//! Why 5% heads rather than SPTAG's 10-20%: on the 200k MiniLM set it read
//! fewer bytes per query at equal recall (see `benches/RESULTS.md`).
//!
//! Search: nearest heads through the coarse level (coarse centroids and
//! heads scored by their int8 codes, a head only when its 1-bit estimate can
//! reach the current n-th best), query-aware pruning
//! (skip a posting whose head is farther than `(1 + epsilon)` times the
//! nearest head's distance), scan the surviving postings: every entry gets a
//! 1-bit RaBitQ-style estimate ([`bits`], 48 bytes per entry at 384-d) and
//! only those that can still reach the rerank threshold get the int8 score;
//! dedup, rerank the best `rerank` candidates exactly, top-k.
//! Memory and disk modes run the same code on the same bytes, so they return
//! identical results.
//!
//! Updates ([`update`]): a new vector gets a new row and is appended to its
//! postings; a delete is a tombstone; a vector moved by a split gets its
//! version bumped so its old replicas go stale. An oversized posting is split
//! by 2-means and only vectors that break nearest-head assignment are
//! reassigned; [`SpannIndex::compact`] drops stale entries, merges
//! undersized postings and rewrites the files, so disk use stays bounded.
//! [`SpannIndex::flush`] appends each modified posting as a new page run (the
//! old run becomes garbage, reported by `stats().garbage_bytes`), so between
//! compactions the posting file grows; compaction currently holds every
//! posting and live vector in RAM while it rewrites them.
//!
//! Disk reads: positional (`pread`), each posting one aligned run of pages;
//! [`SpannIndex::set_direct_io`] switches to `O_DIRECT` (page cache bypassed)
//! and then issues a query's reads together on an I/O thread pool.
//!
//! On disk a directory holds `spann.meta` (everything kept in RAM, one CRC,
//! replaced atomically), `postings-GEN.dat`, `vectors-GEN.dat`, the update
//! log `wal-SEQ.log` ([`log`]: every add and delete is appended and fsync'd
//! there before it returns, and replayed on open) and `LOCK`, held by the
//! one writer (a second gets [`Error::Locked`]; readers open with
//! [`OpenOptions`] with `read_only`).

pub mod bits;
pub mod builder;
pub mod log;
pub mod posting;
pub mod search;
#[cfg(test)]
mod tests;
pub mod update;

use crate::distance::{self, Metric};
use crate::error::{Error, IoContext, Result};
use crate::index::{IdFilter, VectorIndex};
use crate::storage::codec::{Dec, Enc};
use crate::storage::format::{Header, Kind, HEADER_LEN};
use crate::storage::lock::WriterLock;
use crate::storage::posting::{PostingFile, VectorFile, PAGE};
use crate::storage::wal::WalWriter;
use crate::topk::Hit;
use posting::{PostingData, Quantizer};
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Build and maintenance parameters (stored with the index).
#[derive(Debug, Clone, PartialEq)]
pub struct SpannParams {
    /// Heads as a fraction of the points.
    pub head_ratio: f32,
    /// Most postings a vector is assigned to.
    pub replicas: usize,
    /// Nearest heads considered when assigning a vector.
    pub assign_candidates: usize,
    /// RNG rule factor: skip head c if a chosen head s has factor * d(c,s) <= d(x,c).
    /// Above 1 the rule admits more replicas: longer postings, fewer of
    /// them read for the same recall. On the 200k MiniLM set 1.2 (4.9
    /// replicas per vector, 2.6 at 1.0) reached recall 0.95 at 9% more
    /// queries/s than 1.0, and on the 1M set derived from it at ~19% more;
    /// 1.1 and 1.3 (and 1.35 at 1M) did less well. The price: ~1.9x the
    /// posting bytes on disk and, in memory mode, in RAM.
    pub rng_factor: f32,
    /// Longest posting; replicas beyond it are dropped at build and an
    /// update that overflows it splits the posting.
    pub posting_cap: usize,
    /// Postings shorter than this are merged away by compaction.
    pub merge_below: usize,
    /// Branching of the hierarchical k-means.
    pub branch: usize,
    pub kmeans_iters: usize,
    pub sample_per_centroid: usize,
    /// Weight of the cluster-size penalty in balanced k-means.
    pub balance: f32,
    /// Heads per coarse list.
    pub coarse_leaf: usize,
    /// Coarse lists scanned when assigning at build time.
    pub build_coarse_probe: usize,
    pub seed: u64,
    /// Default search parameters.
    pub search: SearchParams,
}

/// Knobs that trade recall for speed at query time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SearchParams {
    /// Most postings read per query.
    pub nprobe: usize,
    /// Query-aware pruning: skip heads farther than (1 + epsilon) x nearest.
    pub epsilon: f32,
    /// Coarse lists scanned to find the nearest heads.
    pub coarse_probe: usize,
    /// Candidates reranked with full-precision vectors (at least k). Also
    /// sets the 1-bit filter's threshold (the `rerank`-th best int8 score so
    /// far). On the 200k MiniLM set 32 gave the recall of 64 to within
    /// 0.0001 at every probe depth measured, for ~20% more queries/s, and 24
    /// (the default) that of 32 to within 0.0002 (nprobe 64 to 128), for
    /// 5-9% more (at rng_factor 1.0). At rng_factor 1.2, 16 cost 0.0012 of
    /// recall at nprobe 56 on the 200k set and 0.0003-0.0006 on the 1M set
    /// derived from it, for 6-8% more queries/s, but its tighter filter
    /// threshold kept only 988 of 1,000 answers of a full int8 scan on 16-d
    /// data (inner product), under the 99% that
    /// `the_filter_keeps_the_answers_of_a_full_int8_scan` asks.
    pub rerank: usize,
    /// Width of the 1-bit filter's margin, in units of its error bound: an
    /// entry is scored with its int8 code only when its 1-bit estimate plus
    /// `filter` bounds reaches the rerank threshold. Larger is safer and
    /// slower; `f32::INFINITY` scores every entry (see [`bits`]). Not stored
    /// with the index.
    pub filter: f32,
}

/// Default [`SearchParams::filter`]. On the 200k MiniLM set (2,000 queries,
/// nprobe 96, rng_factor 1.0): recall 0.9570 at 1.0, 0.9567 at 0.75 for ~4%
/// more queries/s. At rng_factor 1.2 (nprobe 56) 0.75 and 1.0 gave the same
/// recall (0.9575, 0.9579) and speed to within the noise, but 0.75 let 23
/// of 50,000 stored vectors miss themselves as the first hit where 1.0 let
/// 5 (`stored_vectors_find_themselves`): 1.0 is the default again.
/// The heads take the same margin: two thirds of it for the heads gave ~3%
/// more, but 50 instead of 4 of 50,000 stored vectors (16-d Gaussian, built
/// then grown by adds) no longer found themselves first.
pub const DEFAULT_FILTER: f32 = 1.0;

/// Head count at which the default probe depths were tuned: the 200k
/// MiniLM set has ~11,000 heads at the default `head_ratio`.
const TUNED_HEADS: f64 = 11_000.0;

impl SearchParams {
    /// The default search for an index of `heads` heads. A larger index
    /// needs deeper probes for the same recall: `nprobe` and `coarse_probe`
    /// grow with the fourth root of `heads / 11,000`, never below the
    /// defaults (48 / 32: recall@10 0.9567 on the 200k MiniLM set's 2,000
    /// queries, at 8,382 q/s where 56 / 24 gave 0.9579 at 7,964: once the
    /// coarse scan was prefiltered, a coarse list cost less than a posting,
    /// and probing more lists found the nearest heads better). On the 1M set
    /// derived from it (56,706 heads) that gives 72 / 48; there 64 / 32 gave
    /// 0.953 and 64 / 40 0.957 (1,000 queries), and before this scaling (and
    /// at rng_factor 1.0) the defaults gave 0.931.
    pub fn for_heads(heads: usize) -> SearchParams {
        let d = SearchParams::default();
        let f = (heads as f64 / TUNED_HEADS).powf(0.25).max(1.0);
        let round =
            |x: usize, to: usize| (((x as f64 * f) / to as f64).round() as usize).max(1) * to;
        SearchParams {
            nprobe: round(d.nprobe, 8),
            coarse_probe: round(d.coarse_probe, 4),
            ..d
        }
    }
}

impl SpannParams {
    /// The default `build_coarse_probe` for an index of `heads` heads: 16
    /// up to the size the defaults were tuned on, then growing with the
    /// square root of the head count, in steps of 8. A vector is assigned
    /// among the heads of that many coarse lists; at 1M vectors (56,706
    /// heads, 886 lists) 32 instead of 16 raised recall@10 at nprobe 72
    /// from 0.949 to 0.954 (the same queries/s per posting) for a 70% longer
    /// build. A value named at build time is kept.
    pub fn build_probe_for(heads: usize) -> usize {
        let d = SpannParams::default().build_coarse_probe;
        let f = (heads as f64 / TUNED_HEADS).sqrt().max(1.0);
        ((d as f64 * f / 8.0).floor() as usize).max(1) * 8
    }
}

impl Default for SearchParams {
    fn default() -> Self {
        SearchParams {
            nprobe: 48,
            epsilon: 10.0,
            coarse_probe: 32,
            rerank: 24,
            filter: DEFAULT_FILTER,
        }
    }
}

impl Default for SpannParams {
    fn default() -> Self {
        SpannParams {
            head_ratio: 0.05,
            replicas: 8,
            assign_candidates: 64,
            rng_factor: 1.2,
            posting_cap: 160,
            merge_below: 4,
            branch: 32,
            kmeans_iters: 8,
            sample_per_centroid: 128,
            balance: 0.2,
            coarse_leaf: 64,
            build_coarse_probe: 16,
            seed: 20251125,
            search: SearchParams::default(),
        }
    }
}

/// Where postings and full-precision vectors are read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Memory,
    Disk,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode> {
        match s {
            "memory" | "mem" => Ok(Mode::Memory),
            "disk" => Ok(Mode::Disk),
            o => Err(Error::InvalidArgument(format!(
                "unknown mode {o:?}: expected 'memory' or 'disk'"
            ))),
        }
    }
}

/// How to open a saved index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    pub mode: Mode,
    /// Open without the writer lock: the log is replayed but never cut or
    /// appended to, and every write fails with [`Error::ReadOnly`].
    pub read_only: bool,
    /// fsync the update log on every add/delete call (default). Without it
    /// an acknowledged update survives a process crash but not a power loss.
    pub sync: bool,
}

impl OpenOptions {
    pub fn new(mode: Mode) -> Self {
        OpenOptions {
            mode,
            read_only: false,
            sync: true,
        }
    }

    pub fn read_only(mut self, on: bool) -> Self {
        self.read_only = on;
        self
    }

    pub fn sync(mut self, on: bool) -> Self {
        self.sync = on;
        self
    }
}

/// Stage reports of a build: (stage name, done, total).
pub type Progress<'a> = &'a (dyn Fn(&str, usize, usize) + Sync);

/// What [`SpannIndex::stats`] reports.
#[derive(Debug, Clone, PartialEq)]
pub struct SpannStats {
    pub dim: usize,
    pub metric: Metric,
    pub mode: Mode,
    pub live: usize,
    pub rows: usize,
    pub heads: usize,
    pub postings: usize,
    /// Posting entries in total (replicas included, stale ones too).
    pub entries: usize,
    /// Average postings per live vector.
    pub replicas: f64,
    pub ram_bytes: u64,
    /// Every file of the index, the update log included.
    pub disk_bytes: u64,
    /// Bytes of the update log (operations not yet flushed, plus its header).
    pub log_bytes: u64,
    /// Posting pages no longer referenced (reclaimed by compaction).
    pub garbage_bytes: u64,
    pub last_queries: u64,
    pub last_postings_read: u64,
    pub last_bytes_read: u64,
}

/// Counters of the most recent search call.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct LastSearch {
    pub queries: u64,
    pub postings: u64,
    pub bytes: u64,
}

/// Location of a head's posting in the posting file.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Slot {
    pub first_page: u64,
    pub pages: u32,
    pub len: u32,
}

/// Heads and the coarse level over them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Heads {
    pub vecs: Vec<f32>,
    pub alive: Vec<bool>,
    pub coarse: Vec<f32>,
    pub lists: Vec<Vec<u32>>,
    /// Per coarse list, its heads' codes laid out contiguously: int8 codes
    /// (same quantizer as the postings; the query-time head scan reads these,
    /// a quarter of the bytes of `vecs`) and 1-bit filter codes. Derived from
    /// `vecs` and `lists`, kept in step by [`SpannIndex::sync_list`].
    pub lcodes: Vec<ListCodes>,
    /// int8 codes of the coarse centroids and their decoded squared norms
    /// (the query-time coarse scan reads these; kept in step with `coarse`).
    pub ccodes: Vec<i8>,
    pub caux: Vec<f32>,
    /// 1-bit codes of the coarse centroids (of their int8 codes, decoded)
    /// relative to the centroids' mean `cmean`, with their factors (see
    /// [`bits`]): on a large index the coarse scan estimates every centroid
    /// from these and reads the int8 codes of only those that can be among
    /// the nearest. A function of `coarse` alone, so a reopened index
    /// computes the same ones.
    pub cmean: Vec<f32>,
    pub cbits: Vec<u8>,
    pub cfilt: Vec<[f32; 3]>,
}

/// The codes of one coarse list's heads, in list order: int8 codes and their
/// aux, and 1-bit filter codes of each head relative to the list's centroid
/// with their factors `(f, k, e)` (see [`bits`]), one array per factor so
/// the head scan's bound arithmetic vectorises.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ListCodes {
    pub codes: Vec<i8>,
    pub aux: Vec<f32>,
    pub bits: Vec<u8>,
    pub f: Vec<f32>,
    pub k: Vec<f32>,
    pub e: Vec<f32>,
}

/// The SPANN index.
pub struct SpannIndex {
    pub(crate) dim: usize,
    pub(crate) metric: Metric,
    pub(crate) params: SpannParams,
    pub(crate) quant: Quantizer,
    /// Rotation of the 1-bit filter codes (from `params.seed`).
    pub(crate) rot: bits::Rotation,
    pub(crate) heads: Heads,
    // rows
    pub(crate) ids: Vec<u64>,
    pub(crate) versions: Vec<u8>,
    pub(crate) alive: Vec<bool>,
    pub(crate) row_of: HashMap<u64, u32>,
    // postings: `mem[h]` is resident (all of them in memory mode, modified
    // ones in disk mode); `slots[h]` is the copy on disk
    pub(crate) mem: Vec<Option<PostingData>>,
    pub(crate) slots: Vec<Slot>,
    pub(crate) dirty: Vec<bool>,
    // full-precision vectors: rows below `file_rows` are in the vector file;
    // `arena` holds all rows in memory mode, only the later ones in disk mode
    pub(crate) arena: Vec<f32>,
    pub(crate) arena_first_row: usize,
    pub(crate) mode: Mode,
    pub(crate) path: Option<PathBuf>,
    pub(crate) generation: u64,
    pub(crate) pfile: Option<PostingFile>,
    pub(crate) vfile: Option<VectorFile>,
    pub(crate) garbage_pages: u64,
    pub(crate) last: Mutex<LastSearch>,
    // durability: the update log named by `log_seq` (see [`log`])
    pub(crate) read_only: bool,
    /// A disk-mode handle drops the heads' float32 vectors after opening
    /// (queries rank heads by their int8 and 1-bit codes; only updates,
    /// builds and `verify` need them, and `verify` reads them back from the
    /// metadata file): about half of its resident RAM at 1M. A writer drops
    /// them only when its log replay moved no head (so the metadata's copy
    /// is exact) and reads them back before its first write
    /// ([`SpannIndex::writable`]).
    pub(crate) heads_released: bool,
    /// Whether a head vector was added, moved or rewritten since this
    /// handle was built or opened (splits, compaction).
    pub(crate) heads_moved: bool,
    pub(crate) sync: bool,
    pub(crate) log_seq: u64,
    pub(crate) log: Option<WalWriter>,
    pub(crate) log_frames: u64,
    pub(crate) lock: Option<WriterLock>,
}

const META: &str = "spann.meta";

const META_TMP: &str = "spann.meta.tmp";

/// `n + 1` for the next generation or log sequence of the index in `dir`; a
/// metadata file whose number cannot grow (only a corrupted one: real
/// indexes count from 0) is refused instead of overflowing.
pub(crate) fn next_number(n: u64, dir: &Path) -> Result<u64> {
    n.checked_add(1).ok_or_else(|| {
        Error::corruption(
            dir.join(META),
            format!("generation or log sequence {n} cannot grow"),
        )
    })
}

/// The generation of a file named `{prefix}NNNNNN.dat`.
fn parse_gen(name: &str, prefix: &str) -> Option<u64> {
    let d = name.strip_prefix(prefix)?.strip_suffix(".dat")?;
    if d.len() < 6 || !d.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    d.parse().ok()
}

fn postings_name(gen: u64) -> String {
    format!("postings-{gen:06}.dat")
}

fn vectors_name(gen: u64) -> String {
    format!("vectors-{gen:06}.dat")
}

impl SpannIndex {
    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn metric(&self) -> Metric {
        self.metric
    }

    pub fn params(&self) -> &SpannParams {
        &self.params
    }

    /// What a search that names no parameters gets: those saved with the
    /// index, or, where those are the defaults, the defaults scaled to this
    /// index's head count ([`SearchParams::for_heads`], so an index that
    /// grows through adds probes deeper as it grows).
    pub fn search_defaults(&self) -> SearchParams {
        if self.params.search == SearchParams::default() {
            SearchParams::for_heads(self.heads.alive.len())
        } else {
            self.params.search
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Whether this handle was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// fsync the update log on every add/delete (default) or not. Takes
    /// effect for the next log this handle starts (at open, save, flush).
    pub fn set_sync(&mut self, sync: bool) {
        self.sync = sync;
    }

    /// Live vectors.
    pub fn len(&self) -> usize {
        self.row_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.row_of.is_empty()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.row_of.contains_key(&id)
    }

    /// Ids of the live vectors, in row order.
    pub fn ids(&self) -> Vec<u64> {
        (0..self.ids.len())
            .filter(|&r| self.alive[r])
            .map(|r| self.ids[r])
            .collect()
    }

    /// Check dimension and values, normalise for cosine.
    pub fn prepare(&self, vectors: &[f32]) -> Result<Vec<f32>> {
        prepare(vectors, self.dim, self.metric)
    }

    /// Build an index over `vectors` (row-major, `dim` wide) in memory. `ids`
    /// default to 0..n. Call [`SpannIndex::save`] to put it on disk.
    pub fn build(
        vectors: &[f32],
        dim: usize,
        ids: Option<&[u64]>,
        metric: Metric,
        params: SpannParams,
        progress: Option<Progress>,
    ) -> Result<SpannIndex> {
        if dim == 0 {
            return Err(Error::InvalidArgument("dimension must be positive".into()));
        }
        if !vectors.len().is_multiple_of(dim) {
            return Err(Error::DimensionMismatch {
                expected: dim,
                got: vectors.len() % dim,
            });
        }
        let n = vectors.len() / dim;
        if n == 0 {
            return Err(Error::EmptyInput("no vectors to index".into()));
        }
        let ids: Vec<u64> = match ids {
            Some(ids) => {
                if ids.len() != n {
                    return Err(Error::InvalidArgument(format!(
                        "{} ids for {n} vectors",
                        ids.len()
                    )));
                }
                ids.to_vec()
            }
            None => (0..n as u64).collect(),
        };
        let mut row_of = HashMap::with_capacity(n);
        for (r, &id) in ids.iter().enumerate() {
            if row_of.insert(id, r as u32).is_some() {
                return Err(Error::DuplicateId(id));
            }
        }
        if !(params.head_ratio > 0.0 && params.head_ratio <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "head_ratio must be in (0, 1], got {}",
                params.head_ratio
            )));
        }
        if params.replicas == 0 || params.posting_cap == 0 {
            return Err(Error::InvalidArgument(
                "replicas and posting_cap must be positive".into(),
            ));
        }
        let data = prepare(vectors, dim, metric)?;
        let noop = |_: &str, _: usize, _: usize| {};
        let progress: Progress = progress.unwrap_or(&noop);

        // 1. heads
        let done = std::sync::atomic::AtomicUsize::new(0);
        let tick = |m: usize| {
            let d = done.fetch_add(m, std::sync::atomic::Ordering::Relaxed) + m;
            progress("heads", d, n);
        };
        let leaves = builder::hierarchical(
            &data,
            dim,
            (0..n as u32).collect(),
            1.0 / params.head_ratio,
            &params,
            params.seed,
            &tick,
        );
        let mut hv = Vec::with_capacity(leaves.len() * dim);
        for l in &leaves {
            hv.extend_from_slice(&l.centroid);
        }
        drop(leaves);
        let h = hv.len() / dim;
        if metric == Metric::Cosine {
            for v in hv.chunks_exact_mut(dim) {
                // a centroid of unit vectors is never zero unless they cancel
                if distance::normalize(v).is_err() {
                    v[0] = 1.0;
                }
            }
        }
        progress("heads", n, n);
        let heads = search::build_coarse(&hv, dim, &params);
        let quant = Quantizer::fit(&data, dim);
        let mut idx = SpannIndex {
            dim,
            metric,
            quant,
            rot: bits::Rotation::new(dim, params.seed),
            heads: Heads {
                vecs: hv,
                alive: vec![true; h],
                coarse: heads.0,
                lists: heads.1,
                ..Heads::default()
            },
            ids,
            versions: vec![0; n],
            alive: vec![true; n],
            row_of,
            mem: vec![Some(PostingData::default()); h],
            slots: vec![Slot::default(); h],
            dirty: vec![true; h],
            arena: Vec::new(),
            arena_first_row: 0,
            mode: Mode::Memory,
            path: None,
            generation: 0,
            pfile: None,
            vfile: None,
            garbage_pages: 0,
            last: Mutex::new(LastSearch::default()),
            params,
            read_only: false,
            heads_released: false,
            heads_moved: false,
            sync: true,
            log_seq: 0,
            log: None,
            log_frames: 0,
            lock: None,
        };

        idx.encode_heads();
        if idx.params.build_coarse_probe == SpannParams::default().build_coarse_probe {
            idx.params.build_coarse_probe = SpannParams::build_probe_for(h);
        }

        // 2. assignment: choose heads for every vector in parallel
        let done = std::sync::atomic::AtomicUsize::new(0);
        let chunk = 4096;
        let choices: Vec<Vec<(f32, u32)>> = data
            .par_chunks(chunk * dim)
            .flat_map_iter(|block| {
                let out: Vec<Vec<(f32, u32)>> = block
                    .chunks_exact(dim)
                    .map(|v| idx.choose_heads(v, idx.params.build_coarse_probe))
                    .collect();
                let d = done.fetch_add(out.len(), std::sync::atomic::Ordering::Relaxed) + out.len();
                progress("assign", d, n);
                out
            })
            .collect();

        // 3. fill postings, capping their length: a vector's first (nearest)
        // posting is always kept; replicas go first when a posting overflows
        let mut per_head: Vec<Vec<(bool, f32, u32)>> = vec![Vec::new(); h];
        for (r, ch) in choices.iter().enumerate() {
            for (rank, &(d, head)) in ch.iter().enumerate() {
                per_head[head as usize].push((rank > 0, d, r as u32));
            }
        }
        drop(choices);
        let cap = idx.params.posting_cap;
        let q = &idx.quant;
        let built: Vec<PostingData> = per_head
            .into_par_iter()
            .enumerate()
            .map(|(h, mut list)| {
                if list.len() > cap {
                    list.sort_by(|a, b| {
                        a.0.cmp(&b.0)
                            .then(a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal))
                            .then(a.2.cmp(&b.2))
                    });
                    let primaries = list.iter().filter(|e| !e.0).count();
                    list.truncate(cap.max(primaries));
                }
                list.sort_by_key(|e| e.2);
                let mut p = PostingData::default();
                let mut code = vec![0i8; dim];
                let head = idx.head(h as u32);
                let mut rc = vec![0f32; dim];
                idx.rot.apply(head, &mut rc);
                let mut x = vec![0f32; dim];
                let mut b = vec![0u8; bits::code_bytes(dim)];
                for &(_, _, r) in &list {
                    let v = &data[r as usize * dim..(r as usize + 1) * dim];
                    let aux = q.encode(v, &mut code);
                    q.decode(&code, &mut x);
                    let f = bits::encode(&idx.rot, &x, head, &rc, &mut b);
                    p.push(r, 0, aux, &code, &b, f);
                }
                p
            })
            .collect();
        idx.mem = built.into_iter().map(Some).collect();
        idx.arena = data;
        progress("postings", n, n);
        Ok(idx)
    }

    /// Heads for vector `v`: its nearest heads filtered by the RNG rule.
    pub(crate) fn choose_heads(&self, v: &[f32], coarse_probe: usize) -> Vec<(f32, u32)> {
        let cands = self.nearest_heads(v, self.params.assign_candidates, coarse_probe);
        builder::rng_select(
            &cands,
            self.params.replicas,
            self.params.rng_factor,
            |a, b| self.head_head_dist(a, b),
        )
    }

    /// Distance used between a vector and a head, or two heads (lower is
    /// closer): 1 - cos for cosine, squared L2 otherwise.
    #[inline]
    pub(crate) fn dist(&self, a: &[f32], b: &[f32]) -> f32 {
        match self.metric {
            Metric::Cosine => 1.0 - distance::dot(a, b),
            _ => distance::l2_squared(a, b),
        }
    }

    /// Recompute the codes of every head (in their coarse lists).
    pub(crate) fn encode_heads(&mut self) {
        self.sync_lists();
    }

    /// Rebuild the contiguous codes of every coarse list.
    pub(crate) fn sync_lists(&mut self) {
        let all: Vec<ListCodes> = (0..self.heads.lists.len())
            .into_par_iter()
            .map(|c| self.list_codes(c))
            .collect();
        self.heads.lcodes = all;
        let dim = self.dim;
        let nc = self.heads.lists.len();
        self.heads.ccodes = vec![0i8; nc * dim];
        self.heads.caux = vec![0f32; nc];
        for c in 0..nc {
            self.encode_centroid(c);
        }
        self.encode_coarse_bits();
    }

    fn encode_centroid(&mut self, c: usize) {
        let dim = self.dim;
        self.heads.caux[c] = self.quant.encode(
            &self.heads.coarse[c * dim..(c + 1) * dim],
            &mut self.heads.ccodes[c * dim..(c + 1) * dim],
        );
    }

    /// The 1-bit codes of all coarse centroids around their mean (from the
    /// int8 codes, which must be current).
    fn encode_coarse_bits(&mut self) {
        let (mean, cbits, cfilt) = self.coarse_bits();
        self.heads.cmean = mean;
        self.heads.cbits = cbits;
        self.heads.cfilt = cfilt;
    }

    /// (mean, sign codes, factors) of the coarse centroids: see
    /// [`Heads::cbits`].
    pub(crate) fn coarse_bits(&self) -> (Vec<f32>, Vec<u8>, Vec<[f32; 3]>) {
        let dim = self.dim;
        let nb = bits::code_bytes(dim);
        let nc = self.heads.lists.len();
        let mut mean = vec![0f32; dim];
        for cv in self.heads.coarse.chunks_exact(dim) {
            for (m, &x) in mean.iter_mut().zip(cv) {
                *m += x;
            }
        }
        mean.iter_mut().for_each(|m| *m /= nc.max(1) as f32);
        let mut rm = vec![0f32; dim];
        self.rot.apply(&mean, &mut rm);
        let mut cbits = vec![0u8; nc * nb];
        let cfilt: Vec<[f32; 3]> = (0..nc)
            .into_par_iter()
            .zip(cbits.par_chunks_mut(nb))
            .map(|(c, out)| self.coarse_bit(c, &mean, &rm, out))
            .collect();
        (mean, cbits, cfilt)
    }

    /// The 1-bit code of coarse centroid `c` (its int8 code, decoded)
    /// around `mean` (rotated: `rm`), into `out`; returns its factors.
    fn coarse_bit(&self, c: usize, mean: &[f32], rm: &[f32], out: &mut [u8]) -> [f32; 3] {
        let dim = self.dim;
        let mut x = vec![0f32; dim];
        self.quant
            .decode(&self.heads.ccodes[c * dim..(c + 1) * dim], &mut x);
        bits::encode(&self.rot, &x, mean, rm, out)
    }

    /// Rebuild the contiguous codes of coarse list `c`.
    pub(crate) fn sync_list(&mut self, c: usize) {
        let lc = self.list_codes(c);
        let nc = self.heads.lists.len();
        self.heads.lcodes.resize_with(nc, ListCodes::default);
        self.heads.lcodes[c] = lc;
        self.heads.ccodes.resize(nc * self.dim, 0);
        self.heads.caux.resize(nc, 0.0);
        self.encode_centroid(c);
        if self.heads.cfilt.len() == nc {
            // the same list count: the mean is the one the others were
            // encoded around (centroids do not move after the build), so
            // only this one is re-encoded, not all (~4 ms at 1M, on every
            // head split and removal)
            let nb = bits::code_bytes(self.dim);
            let mean = &self.heads.cmean;
            let mut rm = vec![0f32; self.dim];
            self.rot.apply(mean, &mut rm);
            let mut out = vec![0u8; nb];
            let f = self.coarse_bit(c, mean, &rm, &mut out);
            self.heads.cbits[c * nb..(c + 1) * nb].copy_from_slice(&out);
            self.heads.cfilt[c] = f;
        } else {
            self.encode_coarse_bits();
        }
    }

    /// Rebuild the contiguous codes of the list(s) holding head `h`.
    pub(crate) fn sync_lists_of(&mut self, h: u32) {
        let cs: Vec<usize> = (0..self.heads.lists.len())
            .filter(|&c| self.heads.lists[c].contains(&h))
            .collect();
        for c in cs {
            self.sync_list(c);
        }
    }

    fn list_codes(&self, c: usize) -> ListCodes {
        let dim = self.dim;
        let nb = bits::code_bytes(dim);
        let list = &self.heads.lists[c];
        let cent = &self.heads.coarse[c * dim..(c + 1) * dim];
        let mut rc = vec![0f32; dim];
        self.rot.apply(cent, &mut rc);
        let mut x = vec![0f32; dim];
        let mut lc = ListCodes {
            codes: Vec::with_capacity(list.len() * dim),
            aux: Vec::with_capacity(list.len()),
            bits: vec![0u8; list.len() * nb],
            f: Vec::with_capacity(list.len()),
            k: Vec::with_capacity(list.len()),
            e: Vec::with_capacity(list.len()),
        };
        let mut code = vec![0i8; dim];
        for (i, &h) in list.iter().enumerate() {
            let aux = self.quant.encode(self.head(h), &mut code);
            lc.codes.extend_from_slice(&code);
            lc.aux.push(aux);
            self.quant.decode(&code, &mut x);
            let [f, k, e] =
                bits::encode(&self.rot, &x, cent, &rc, &mut lc.bits[i * nb..(i + 1) * nb]);
            lc.f.push(f);
            lc.k.push(k);
            lc.e.push(e);
        }
        lc
    }

    /// Re-encode head `h` after its vector changed (or was appended).
    pub(crate) fn encode_head(&mut self, h: u32) {
        self.sync_lists_of(h);
    }

    pub(crate) fn head(&self, h: u32) -> &[f32] {
        debug_assert!(!self.heads_released, "head vectors were released");
        &self.heads.vecs[h as usize * self.dim..(h as usize + 1) * self.dim]
    }

    /// The head vectors a disk-mode handle released (see
    /// [`SpannIndex::heads_released`]), read back from its metadata file,
    /// which holds exactly them as long as no checkpoint ran since the
    /// handle opened. A reader is told to reopen when a writer has
    /// checkpointed since; for the writer itself that cannot happen (every
    /// write reads them back first) and is reported as corruption.
    pub(crate) fn released_heads(&self) -> Result<Vec<f32>> {
        let dir = self.path.as_ref().expect("a released handle has a path");
        let m = read_meta(dir)?;
        if (m.generation, m.log_seq) != (self.generation, self.log_seq) {
            return Err(if self.read_only {
                Error::InvalidArgument(
                    "the index was checkpointed by a writer since this read-only handle opened it: reopen to verify"
                        .into(),
                )
            } else {
                Error::corruption(
                    dir.join(META),
                    "the metadata changed under this index's writer: its head vectors cannot be read back",
                )
            });
        }
        // (a reader may have replayed splits over them: its heads can
        // outnumber the file's; a writer released them only if none moved)
        if !self.read_only && m.heads.vecs.len() != self.heads.alive.len() * self.dim {
            return Err(Error::corruption(
                dir.join(META),
                "the metadata holds a different number of heads than this handle opened",
            ));
        }
        Ok(m.heads.vecs)
    }

    fn head_head_dist(&self, a: u32, b: u32) -> f32 {
        self.dist(self.head(a), self.head(b))
    }

    /// Save everything to the directory `dir` (created if needed) as a new
    /// generation, and switch this handle to it (keeping its mode). The
    /// handle takes `dir`'s writer lock (if it does not hold it already) and
    /// starts a new, empty update log there in the same commit (see [`log`]).
    pub fn save(&mut self, dir: &Path) -> Result<()> {
        self.writable()?;
        std::fs::create_dir_all(dir).at(dir)?;
        let same_dir = self.lock.is_some()
            && self.path.as_deref().is_some_and(|p| {
                p == dir
                    || matches!(
                        (std::fs::canonicalize(p), std::fs::canonicalize(dir)),
                        (Ok(a), Ok(b)) if a == b
                    )
            });
        let new_lock = if same_dir {
            None
        } else {
            Some(WriterLock::acquire(dir)?)
        };
        let gen = next_number(self.generation, dir)?;
        let ppath = dir.join(postings_name(gen));
        let vpath = dir.join(vectors_name(gen));
        let mut pf = PostingFile::create(&ppath, gen)?;
        let mut vf = VectorFile::create(&vpath, gen, self.dim)?;
        let mut slots = vec![Slot::default(); self.heads.alive.len()];
        for (h, slot) in slots.iter_mut().enumerate() {
            if !self.heads.alive[h] {
                continue;
            }
            let p = self.load_posting(h as u32)?;
            let stream = p.encode(h as u32, self.dim, pf.has_filter());
            let (first, pages) = pf.append(&stream)?;
            *slot = Slot {
                first_page: first,
                pages,
                len: p.len() as u32,
            };
        }
        let mut buf = vec![0f32; self.dim];
        let rows = self.ids.len();
        let mut block = Vec::with_capacity(4096 * self.dim);
        for r in 0..rows {
            self.read_vector(r as u32, &mut buf)?;
            block.extend_from_slice(&buf);
            if block.len() >= 4096 * self.dim {
                vf.append(&block)?;
                block.clear();
            }
        }
        vf.append(&block)?;
        pf.sync()?;
        vf.sync()?;
        // the next log: above every log of this handle and of the directory
        let seq = if same_dir {
            self.log_seq
        } else {
            self.log_seq
                .max(log::logs_in(dir)?.into_iter().max().unwrap_or(0))
        } + 1;
        let old = self.path.clone().map(|p| (p, self.generation));
        let old_slots = std::mem::replace(&mut self.slots, slots);
        let (old_gen, old_garbage) = (self.generation, self.garbage_pages);
        self.generation = gen;
        self.garbage_pages = 0;
        let committed = self.commit_meta(dir, Some(seq), new_lock);
        if self.log_seq != seq {
            // not committed: the old files and log stay current
            self.slots = old_slots;
            self.generation = old_gen;
            self.garbage_pages = old_garbage;
            let _ = std::fs::remove_file(&ppath);
            let _ = std::fs::remove_file(&vpath);
            return committed;
        }
        if let Some((op, og)) = old {
            if op == dir && og != gen {
                let _ = std::fs::remove_file(dir.join(postings_name(og)));
                let _ = std::fs::remove_file(dir.join(vectors_name(og)));
            }
        }
        self.path = Some(dir.to_path_buf());
        self.pfile = Some(PostingFile::open(&ppath, true)?);
        self.vfile = Some(VectorFile::open(&vpath, self.dim, rows as u64, true)?);
        self.dirty = vec![false; self.heads.alive.len()];
        if self.mode == Mode::Disk {
            self.evict();
        }
        committed
    }

    /// Commit this handle's metadata to `dir`. With `new_seq`, first create
    /// that log (empty, fsync'd) and name it in the metadata; once the
    /// metadata is renamed into place, append to the new log and remove the
    /// others. On an error before the rename nothing changes (`log_seq`
    /// keeps its value); after it, the handle is switched and the error (of
    /// the directory fsync) is still returned.
    pub(crate) fn commit_meta(
        &mut self,
        dir: &Path,
        new_seq: Option<u64>,
        new_lock: Option<WriterLock>,
    ) -> Result<()> {
        let old_seq = self.log_seq;
        let mut writer = None;
        if let Some(seq) = new_seq {
            writer = Some(WalWriter::create(
                &dir.join(log::log_name(seq)),
                seq,
                self.sync,
            )?);
            self.log_seq = seq;
        }
        #[cfg(test)]
        tests::crash_point(1);
        let renamed = stage_meta(dir, self).and_then(|tmp| {
            #[cfg(test)]
            tests::crash_point(2);
            std::fs::rename(&tmp, dir.join(META)).at(dir.join(META))
        });
        if let Err(e) = renamed {
            if let Some(seq) = new_seq {
                self.log_seq = old_seq;
                drop(writer);
                let _ = std::fs::remove_file(dir.join(log::log_name(seq)));
            }
            return Err(e);
        }
        // committed: the metadata on disk now names the new log
        if let Some(w) = writer {
            self.log = Some(w);
            self.log_frames = 0;
        }
        if let Some(l) = new_lock {
            self.lock = Some(l);
        }
        let synced = crate::storage::sync_dir(dir);
        #[cfg(test)]
        tests::crash_point(3);
        if new_seq.is_some() {
            log::remove_other_logs(dir, self.log_seq);
        }
        synced
    }

    /// Drop resident postings and vectors that are safely on disk.
    pub(crate) fn evict(&mut self) {
        for (h, m) in self.mem.iter_mut().enumerate() {
            if !self.dirty[h] {
                *m = None;
            }
        }
        let file_rows = self.vfile.as_ref().map_or(0, |f| f.rows() as usize);
        if self.arena_first_row < file_rows {
            let drop_rows = file_rows - self.arena_first_row;
            self.arena
                .drain(..drop_rows.min(self.arena.len() / self.dim) * self.dim);
            self.arena_first_row = file_rows;
        }
        self.arena.shrink_to_fit();
    }

    /// Open a saved index as its writer (taking the directory's lock; a
    /// second writer gets [`Error::Locked`]). `Mode::Memory` loads postings
    /// and vectors into RAM; `Mode::Disk` keeps only heads and the row table
    /// resident. The update log is replayed in both modes.
    pub fn open(dir: &Path, mode: Mode) -> Result<SpannIndex> {
        Self::open_with(dir, OpenOptions::new(mode))
    }

    /// Open a saved index without the writer lock; writes fail with
    /// [`Error::ReadOnly`].
    pub fn open_read_only(dir: &Path, mode: Mode) -> Result<SpannIndex> {
        Self::open_with(dir, OpenOptions::new(mode).read_only(true))
    }

    pub fn open_with(dir: &Path, opts: OpenOptions) -> Result<SpannIndex> {
        let meta = dir.join(META);
        std::fs::metadata(&meta).at(&meta)?;
        if !opts.read_only {
            let lock = WriterLock::acquire(dir)?;
            return Self::open_inner(dir, opts, Some(lock));
        }
        // a reader may race a writer's checkpoint, which removes the files
        // (old log, old generation) the previous metadata names: retry
        let mut tries = 0;
        loop {
            match Self::open_inner(dir, opts, None) {
                Err(Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound && tries < 5 =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20 << tries));
                }
                r => return r,
            }
        }
    }

    fn open_inner(dir: &Path, opts: OpenOptions, lock: Option<WriterLock>) -> Result<SpannIndex> {
        let mode = opts.mode;
        let mut idx = read_meta(dir)?;
        idx.encode_heads();
        idx.mode = mode;
        idx.read_only = opts.read_only;
        idx.sync = opts.sync;
        idx.lock = lock;
        let ppath = dir.join(postings_name(idx.generation));
        let vpath = dir.join(vectors_name(idx.generation));
        let pf = PostingFile::open(&ppath, !opts.read_only)?;
        if idx.garbage_pages > pf.bytes() / PAGE as u64 {
            return Err(Error::corruption(
                dir.join(META),
                format!(
                    "{} garbage pages in a smaller posting file",
                    idx.garbage_pages
                ),
            ));
        }
        let file_rows = idx.arena_first_row; // read_meta stores the file's row count here
        let vf = VectorFile::open(&vpath, idx.dim, file_rows as u64, !opts.read_only)?;
        idx.pfile = Some(pf);
        idx.vfile = Some(vf);
        idx.path = Some(dir.to_path_buf());
        if mode == Mode::Memory {
            let loaded: Vec<Option<PostingData>> = (0..idx.heads.alive.len())
                .into_par_iter()
                .map(|h| {
                    if idx.heads.alive[h] {
                        idx.read_posting(h as u32).map(Some)
                    } else {
                        Ok(None)
                    }
                })
                .collect::<Result<_>>()?;
            idx.mem = loaded;
            let mut arena = vec![0f32; file_rows * idx.dim];
            arena
                .par_chunks_mut(idx.dim)
                .enumerate()
                .try_for_each(|(r, out)| idx.vfile.as_ref().unwrap().read(r as u64, out))?;
            idx.arena = arena;
            idx.arena_first_row = 0;
        }
        let lpath = dir.join(log::log_name(idx.log_seq));
        if opts.read_only && !lpath.exists() && read_meta(dir)?.log_seq != idx.log_seq {
            // a writer's checkpoint removed the log after we read the
            // metadata: start again from the new metadata
            return Err(Error::Io {
                file: lpath,
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        let replay = idx.replay_log(&lpath)?;
        // a read-only disk-mode handle never moves a head: its float32
        // vectors can go once the log is replayed (unless the posting file
        // predates the filter columns, which are computed from them when a
        // posting is read). A writer's can go too while they equal the
        // metadata's copy, which `writable` reads back before a write
        if (opts.read_only || !idx.heads_moved)
            && mode == Mode::Disk
            && idx.pfile.as_ref().unwrap().has_filter()
        {
            idx.heads.vecs = Vec::new();
            idx.heads_released = true;
        }
        if !opts.read_only {
            idx.log = Some(match replay {
                Some(r) => WalWriter::open_append(&lpath, r.valid_len, opts.sync)?,
                None => {
                    let w = WalWriter::create(&lpath, idx.log_seq, opts.sync)?;
                    crate::storage::sync_dir(dir)?;
                    w
                }
            });
            idx.remove_stale_files(dir);
        }
        Ok(idx)
    }

    /// What a crash mid-checkpoint may leave behind: logs other than the
    /// current one, a staged metadata file, files of other generations.
    fn remove_stale_files(&self, dir: &Path) {
        log::remove_other_logs(dir, self.log_seq);
        let _ = std::fs::remove_file(dir.join(META_TMP));
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let gen = parse_gen(name, "postings-").or_else(|| parse_gen(name, "vectors-"));
            if gen.is_some_and(|g| g != self.generation) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Read postings and vectors with `O_DIRECT` (bypassing the page cache)
    /// where the file system allows it; returns whether it does.
    pub fn set_direct_io(&mut self, on: bool) -> bool {
        let a = self.pfile.as_mut().is_some_and(|f| f.use_direct_io(on));
        let b = self.vfile.as_mut().is_some_and(|f| f.use_direct_io(on));
        a && b
    }

    /// Read a posting from the posting file (not the resident copy).
    pub(crate) fn read_posting(&self, h: u32) -> Result<PostingData> {
        let s = self.slots[h as usize];
        let pf = self.pfile.as_ref().ok_or_else(|| {
            Error::InvalidArgument("posting not resident and index has no file".into())
        })?;
        if s.pages == 0 {
            return Ok(PostingData::default());
        }
        let payload = pf.read(s.first_page, s.pages)?;
        let mut p = PostingData::decode(&payload, self.dim, h, pf.path(), pf.has_filter())?;
        if p.len() != s.len as usize {
            return Err(Error::corruption(
                pf.path(),
                format!(
                    "posting {h} holds {} entries, directory says {}",
                    p.len(),
                    s.len
                ),
            ));
        }
        if let Some(&r) = p.rows.iter().find(|&&r| r as usize >= self.ids.len()) {
            return Err(Error::corruption(
                pf.path(),
                format!(
                    "posting {h} names row {r} beyond the {} rows",
                    self.ids.len()
                ),
            ));
        }
        if !pf.has_filter() {
            // a file written before the filter columns existed
            self.fill_filter(h, &mut p);
        }
        Ok(p)
    }

    /// 1-bit filter code and factors of an entry with int8 `code` in the
    /// posting of head `h` (a function of the code and the head's vector).
    pub(crate) fn entry_filter(&self, h: u32, code: &[i8]) -> (Vec<u8>, [f32; 3]) {
        let dim = self.dim;
        let head = self.head(h);
        let mut rc = vec![0f32; dim];
        self.rot.apply(head, &mut rc);
        let mut x = vec![0f32; dim];
        self.quant.decode(code, &mut x);
        let mut b = vec![0u8; bits::code_bytes(dim)];
        let f = bits::encode(&self.rot, &x, head, &rc, &mut b);
        (b, f)
    }

    /// (Re)compute the filter columns of every entry of `p`, the posting of
    /// head `h`.
    pub(crate) fn fill_filter(&self, h: u32, p: &mut PostingData) {
        self.fill_filter_from(self.head(h), p);
    }

    /// [`SpannIndex::fill_filter`] for a posting whose head vector is `head`.
    fn fill_filter_from(&self, head: &[f32], p: &mut PostingData) {
        let dim = self.dim;
        let nb = bits::code_bytes(dim);
        let mut rc = vec![0f32; dim];
        self.rot.apply(head, &mut rc);
        let mut x = vec![0f32; dim];
        p.bits = vec![0u8; p.len() * nb];
        p.filt = vec![[0f32; 3]; p.len()];
        for i in 0..p.len() {
            self.quant.decode(&p.codes[i * dim..(i + 1) * dim], &mut x);
            p.filt[i] = bits::encode(&self.rot, &x, head, &rc, &mut p.bits[i * nb..(i + 1) * nb]);
        }
    }

    /// The posting of head `h`, resident or read from disk.
    pub(crate) fn load_posting(&self, h: u32) -> Result<std::borrow::Cow<'_, PostingData>> {
        match &self.mem[h as usize] {
            Some(p) => Ok(std::borrow::Cow::Borrowed(p)),
            None => Ok(std::borrow::Cow::Owned(self.read_posting(h)?)),
        }
    }

    /// The full-precision vector of row `r`.
    pub(crate) fn read_vector(&self, r: u32, out: &mut [f32]) -> Result<()> {
        let r = r as usize;
        if r >= self.arena_first_row {
            let i = r - self.arena_first_row;
            out.copy_from_slice(&self.arena[i * self.dim..(i + 1) * self.dim]);
            Ok(())
        } else {
            self.vfile
                .as_ref()
                .expect("rows below arena_first_row live in the vector file")
                .read(r as u64, out)
        }
    }

    /// Check every posting page and vector record of a saved index.
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut rep = VerifyReport::default();
        // the head vectors the filter codes were computed from: this
        // handle's, or, where it released them, the metadata file's again
        // (the same generation and log: a writer's checkpoint since then
        // means the handle is stale). A head the log replay moved or added
        // owns a modified posting, which is not checked: the unmodified
        // ones' heads are as in the file.
        let reread;
        let heads: &[f32] = if self.heads_released {
            reread = self.released_heads()?;
            &reread
        } else {
            &self.heads.vecs
        };
        let dim = self.dim;
        for h in 0..self.heads.alive.len() {
            if self.heads.alive[h] && self.slots[h].pages > 0 {
                let p = self.read_posting(h as u32)?;
                // the filter columns are a function of the codes and the
                // head: a mismatch (checksums intact) means a bad writer. A
                // posting modified since the last flush (by updates or a log
                // replay) may belong to a head that has moved since its
                // copy on disk was written: only an unmodified one is checked.
                let mut again = p.clone();
                if !self.dirty[h] {
                    let head = heads.get(h * dim..(h + 1) * dim).ok_or_else(|| {
                        Error::corruption(
                            self.path.clone().unwrap_or_default().join(META),
                            format!("posting {h} unmodified since the last checkpoint, but its head is not in it"),
                        )
                    })?;
                    self.fill_filter_from(head, &mut again);
                }
                if again != p {
                    return Err(Error::corruption(
                        self.pfile.as_ref().unwrap().path(),
                        format!("posting {h}: filter codes do not match its int8 codes"),
                    ));
                }
                rep.postings += 1;
                rep.entries += p.len() as u64;
                rep.pages += self.slots[h].pages as u64;
            }
        }
        if let Some(vf) = &self.vfile {
            let mut buf = vec![0f32; self.dim];
            for r in 0..vf.rows() {
                vf.read(r, &mut buf)?;
                rep.vectors += 1;
            }
        }
        Ok(rep)
    }

    pub fn stats(&self) -> SpannStats {
        let heads = self.heads.alive.iter().filter(|&&a| a).count();
        let mut postings = 0;
        let mut entries = 0u64;
        for h in 0..self.heads.alive.len() {
            if !self.heads.alive[h] {
                continue;
            }
            let len = match &self.mem[h] {
                Some(p) => p.len() as u64,
                None => self.slots[h].len as u64,
            };
            if len > 0 {
                postings += 1;
            }
            entries += len;
        }
        let mem_post: usize = self.mem.iter().flatten().map(|p| p.ram_bytes()).sum();
        let ram = self.heads.vecs.capacity() * 4
            + self
                .heads
                .lcodes
                .iter()
                .map(|l| {
                    l.codes.capacity()
                        + l.aux.capacity() * 4
                        + l.bits.capacity()
                        + (l.f.capacity() + l.k.capacity() + l.e.capacity()) * 4
                })
                .sum::<usize>()
            + self.heads.coarse.capacity() * 4
            + self.heads.ccodes.capacity()
            + self.heads.caux.capacity() * 4
            + self.heads.cmean.capacity() * 4
            + self.heads.cbits.capacity()
            + self.heads.cfilt.capacity() * 12
            + self
                .heads
                .lists
                .iter()
                .map(|l| l.capacity() * 4 + 24)
                .sum::<usize>()
            + self.heads.alive.capacity()
            + self.ids.capacity() * 8
            + self.versions.capacity()
            + self.alive.capacity()
            + self.row_of.capacity() * 16
            + self.mem.capacity() * std::mem::size_of::<Option<PostingData>>()
            + mem_post
            + self.slots.capacity() * std::mem::size_of::<Slot>()
            + self.arena.capacity() * 4
            + self.quant.lo.len() * 8;
        let log_bytes = match (&self.log, &self.path) {
            (Some(w), _) => w.len(),
            (None, Some(dir)) => {
                std::fs::metadata(dir.join(log::log_name(self.log_seq))).map_or(0, |m| m.len())
            }
            (None, None) => 0,
        };
        let disk = match &self.path {
            Some(dir) => {
                let meta = std::fs::metadata(dir.join(META)).map_or(0, |m| m.len());
                meta + self.pfile.as_ref().map_or(0, |f| f.bytes())
                    + self.vfile.as_ref().map_or(0, |f| f.bytes())
                    + log_bytes
            }
            None => 0,
        };
        let last = *self.last.lock().unwrap();
        let live = self.len();
        SpannStats {
            dim: self.dim,
            metric: self.metric,
            mode: self.mode,
            live,
            rows: self.ids.len(),
            heads,
            postings,
            entries: entries as usize,
            replicas: if live > 0 {
                entries as f64 / live as f64
            } else {
                0.0
            },
            ram_bytes: ram as u64,
            disk_bytes: disk,
            log_bytes,
            garbage_bytes: self.garbage_pages * PAGE as u64,
            last_queries: last.queries,
            last_postings_read: last.postings,
            last_bytes_read: last.bytes,
        }
    }
}

/// What [`SpannIndex::verify`] checked.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct VerifyReport {
    pub postings: u64,
    pub entries: u64,
    pub pages: u64,
    pub vectors: u64,
}

/// Check dimension and values; normalise for cosine.
pub(crate) fn prepare(vectors: &[f32], dim: usize, metric: Metric) -> Result<Vec<f32>> {
    if dim == 0 || !vectors.len().is_multiple_of(dim) {
        return Err(Error::DimensionMismatch {
            expected: dim,
            got: if dim == 0 {
                vectors.len()
            } else {
                vectors.len() % dim
            },
        });
    }
    distance::check_finite(vectors, dim)?;
    let mut out = vectors.to_vec();
    if metric.normalizes() {
        out.par_chunks_mut(dim).try_for_each(distance::normalize)?;
    }
    Ok(out)
}

/// Write `spann.meta.tmp` and fsync it; [`SpannIndex::commit_meta`] renames
/// it into place.
fn stage_meta(dir: &Path, idx: &SpannIndex) -> Result<PathBuf> {
    let p = &idx.params;
    let mut e = Enc::with_capacity(idx.heads.vecs.len() * 4 + idx.ids.len() * 10 + 1024);
    e.u32(idx.dim as u32);
    e.u8(idx.metric.code());
    e.u64(idx.generation);
    // params
    e.f32(p.head_ratio);
    e.u32(p.replicas as u32);
    e.u32(p.assign_candidates as u32);
    e.f32(p.rng_factor);
    e.u32(p.posting_cap as u32);
    e.u32(p.merge_below as u32);
    e.u32(p.branch as u32);
    e.u32(p.kmeans_iters as u32);
    e.u32(p.sample_per_centroid as u32);
    e.f32(p.balance);
    e.u32(p.coarse_leaf as u32);
    e.u32(p.build_coarse_probe as u32);
    e.u64(p.seed);
    e.u32(p.search.nprobe as u32);
    e.f32(p.search.epsilon);
    e.u32(p.search.coarse_probe as u32);
    e.u32(p.search.rerank as u32);
    e.f32s(&idx.quant.lo);
    e.f32s(&idx.quant.scale);
    // heads
    let h = idx.heads.alive.len();
    e.u32(h as u32);
    for &a in &idx.heads.alive {
        e.u8(a as u8);
    }
    e.f32s(&idx.heads.vecs);
    e.u32(idx.heads.lists.len() as u32);
    e.f32s(&idx.heads.coarse);
    for l in &idx.heads.lists {
        e.u32(l.len() as u32);
        for &x in l {
            e.u32(x);
        }
    }
    for s in &idx.slots {
        e.u64(s.first_page);
        e.u32(s.pages);
        e.u32(s.len);
    }
    // rows
    e.u64(idx.ids.len() as u64);
    for &id in &idx.ids {
        e.u64(id);
    }
    e.bytes(&idx.versions);
    for &a in &idx.alive {
        e.u8(a as u8);
    }
    // rows in the vector file: all of them, since flush and save both write
    // every row before the metadata (the file of a handle being saved
    // elsewhere may hold fewer: it is not the one this metadata names)
    e.u64(idx.ids.len() as u64);
    e.u64(idx.garbage_pages);
    // added after format 1.0's first release: older files end before it
    e.u64(idx.log_seq);
    let body = e.into_inner();
    let mut buf = Vec::with_capacity(HEADER_LEN + body.len() + 12);
    buf.extend_from_slice(&Header::new(Kind::SpannMeta, idx.generation).encode());
    buf.extend_from_slice(&(body.len() as u64).to_le_bytes());
    buf.extend_from_slice(&body);
    buf.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    let tmp = dir.join(META_TMP);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).at(&tmp)?;
        f.write_all(&buf).at(&tmp)?;
        f.sync_all().at(&tmp)?;
    }
    Ok(tmp)
}

fn read_meta(dir: &Path) -> Result<SpannIndex> {
    let path = dir.join(META);
    let bytes = std::fs::read(&path).at(&path)?;
    Header::decode(&bytes, Kind::SpannMeta, &path)?;
    let bad = |d: String| Error::corruption(&path, d);
    if bytes.len() < HEADER_LEN + 12 {
        return Err(bad("truncated".into()));
    }
    let blen = u64::from_le_bytes(bytes[HEADER_LEN..HEADER_LEN + 8].try_into().unwrap()) as usize;
    if blen != bytes.len() - HEADER_LEN - 12 {
        return Err(bad(format!(
            "body length {blen} does not match the file's {} bytes",
            bytes.len()
        )));
    }
    let body = &bytes[HEADER_LEN + 8..HEADER_LEN + 8 + blen];
    let crc = u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().unwrap());
    if crc != crc32fast::hash(body) {
        return Err(bad("checksum mismatch".into()));
    }
    let de = |e: crate::storage::codec::DecodeError| Error::corruption(&path, e.0);
    let mut d = Dec::new(body);
    let dim = d.u32().map_err(de)? as usize;
    if dim == 0 {
        return Err(bad("dimension 0".into()));
    }
    let metric =
        Metric::from_code(d.u8().map_err(de)?).ok_or_else(|| bad("unknown metric code".into()))?;
    let generation = d.u64().map_err(de)?;
    let mut p = SpannParams {
        head_ratio: d.f32().map_err(de)?,
        replicas: d.u32().map_err(de)? as usize,
        assign_candidates: d.u32().map_err(de)? as usize,
        rng_factor: d.f32().map_err(de)?,
        posting_cap: d.u32().map_err(de)? as usize,
        merge_below: d.u32().map_err(de)? as usize,
        branch: d.u32().map_err(de)? as usize,
        kmeans_iters: d.u32().map_err(de)? as usize,
        sample_per_centroid: d.u32().map_err(de)? as usize,
        balance: d.f32().map_err(de)?,
        coarse_leaf: d.u32().map_err(de)? as usize,
        build_coarse_probe: d.u32().map_err(de)? as usize,
        seed: d.u64().map_err(de)?,
        ..SpannParams::default()
    };
    p.search = SearchParams {
        nprobe: d.u32().map_err(de)? as usize,
        epsilon: d.f32().map_err(de)?,
        coarse_probe: d.u32().map_err(de)? as usize,
        rerank: d.u32().map_err(de)? as usize,
        filter: DEFAULT_FILTER,
    };
    // the parameters drive loops and reservations of later updates: refuse
    // values no build writes, so a damaged (checksum-valid) file cannot make
    // an add spin in k-means for hours (found by fuzzing)
    let sizes = [
        p.replicas,
        p.assign_candidates,
        p.posting_cap,
        p.merge_below,
        p.branch,
        p.sample_per_centroid,
        p.coarse_leaf,
        p.build_coarse_probe,
    ];
    if p.kmeans_iters > 1000 || sizes.iter().any(|&x| x > 1 << 20) {
        return Err(bad(format!("implausible index parameters {p:?}")));
    }
    let lo = d.f32s(dim).map_err(de)?;
    let scale = d.f32s(dim).map_err(de)?;
    let h = d.len_prefix(1 + dim * 4).map_err(de)?;
    let mut halive = Vec::with_capacity(h);
    for _ in 0..h {
        halive.push(d.u8().map_err(de)? != 0);
    }
    let hv = d.f32s(h * dim).map_err(de)?;
    let c = d.len_prefix(dim * 4 + 4).map_err(de)?;
    let coarse = d.f32s(c * dim).map_err(de)?;
    let mut lists = Vec::with_capacity(c);
    for _ in 0..c {
        let n = d.len_prefix(4).map_err(de)?;
        let mut l = Vec::with_capacity(n);
        for _ in 0..n {
            let x = d.u32().map_err(de)?;
            if x as usize >= h {
                return Err(bad(format!("coarse list names head {x} of {h}")));
            }
            // (a head leaves its lists when it dies; queries rely on that)
            if !halive[x as usize] {
                return Err(bad(format!("coarse list names dead head {x}")));
            }
            l.push(x);
        }
        lists.push(l);
    }
    let mut slots = Vec::with_capacity(h);
    for _ in 0..h {
        slots.push(Slot {
            first_page: d.u64().map_err(de)?,
            pages: d.u32().map_err(de)?,
            len: d.u32().map_err(de)?,
        });
    }
    let n = d.u64().map_err(de)? as usize;
    if n.saturating_mul(10) > d.remaining() {
        return Err(bad(format!("row count {n} exceeds the file")));
    }
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(d.u64().map_err(de)?);
    }
    let versions = d.take(n).map_err(de)?.to_vec();
    let alive: Vec<bool> = d.take(n).map_err(de)?.iter().map(|&a| a != 0).collect();
    let file_rows = d.u64().map_err(de)? as usize;
    let garbage_pages = d.u64().map_err(de)?;
    let log_seq = if d.remaining() >= 8 {
        d.u64().map_err(de)?
    } else {
        0
    };
    if file_rows != n {
        return Err(bad(format!("{n} rows but {file_rows} in the vector file")));
    }
    let mut row_of = HashMap::with_capacity(n);
    for r in 0..n {
        if alive[r] && row_of.insert(ids[r], r as u32).is_some() {
            return Err(bad(format!("id {} is live twice", ids[r])));
        }
    }
    Ok(SpannIndex {
        dim,
        metric,
        rot: bits::Rotation::new(dim, p.seed),
        params: p,
        quant: Quantizer { lo, scale },
        heads: Heads {
            vecs: hv,
            alive: halive,
            coarse,
            lists,
            ..Heads::default()
        },
        ids,
        versions,
        alive,
        row_of,
        mem: vec![None; h],
        slots,
        dirty: vec![false; h],
        arena: Vec::new(),
        arena_first_row: file_rows,
        mode: Mode::Disk,
        path: Some(dir.to_path_buf()),
        generation,
        pfile: None,
        vfile: None,
        garbage_pages,
        last: Mutex::new(LastSearch::default()),
        read_only: false,
        heads_released: false,
        heads_moved: false,
        sync: true,
        log_seq,
        log: None,
        log_frames: 0,
        lock: None,
    })
}

impl VectorIndex for SpannIndex {
    fn dim(&self) -> usize {
        self.dim
    }

    fn metric(&self) -> Metric {
        self.metric
    }

    fn len(&self) -> usize {
        self.row_of.len()
    }

    /// Vectors are already prepared by the caller. Panics only on invalid
    /// input the store has already rejected.
    fn upsert(&mut self, ids: &[u64], vectors: &[f32]) {
        self.upsert_prepared(ids, vectors.to_vec())
            .expect("spann upsert of prepared vectors");
    }

    /// Panics only if the index has a log and appending to it fails (the
    /// store's own index has none).
    fn remove(&mut self, ids: &[u64]) {
        if let Err(e) = self.delete(ids) {
            panic!("spann delete failed: {e}");
        }
    }

    /// The trait has no error channel: a disk read error or a corrupted
    /// posting panics here rather than returning wrong neighbours. Callers
    /// that want the error use [`SpannIndex::search`].
    fn search(&self, queries: &[f32], k: usize, filter: Option<&IdFilter>) -> Vec<Vec<Hit>> {
        self.search_prepared(queries, k, &self.search_defaults(), filter)
            .unwrap_or_else(|e| panic!("spann search failed: {e}"))
    }
}

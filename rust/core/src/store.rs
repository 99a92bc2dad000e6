//! [`Store`]: a directory of records and vectors, the one place that
//! coordinates the write-ahead log, the segment, the manifest, the writer
//! lock and the in-memory indexes.
//!
//! Write path: validate everything first (so a rejected call changes
//! nothing), append the operation to the log (the acknowledgement point),
//! then apply it in memory. Checkpoints write all live records to a new
//! segment, start a new log, and commit both by replacing the manifest; they
//! run when the log outgrows the segment (so rewriting costs at most one
//! extra write per byte logged) or on [`Store::flush`].
//!
//! Open path: read the manifest, load its segment, replay its log (cutting a
//! torn tail when opened for writing), and delete files no manifest names
//! (leftovers of a checkpoint that crashed before its commit).

use crate::distance::{self, Metric};
use crate::error::{Error, IoContext, Result};
use crate::index::flat::FlatIndex;
use crate::index::lsh::LshTables;
use crate::index::spann::{SpannIndex, SpannParams};
use crate::index::VectorIndex;
use crate::memory::links::{self, DEFAULT_MAX_DEGREE};
use crate::memory::{DecayPolicy, Filter, Record, Scope, Weights};
use crate::storage::format::HEADER_LEN;
use crate::storage::lock::WriterLock;
use crate::storage::manifest::{self, Manifest};
use crate::storage::wal::{self, Touch, WalOp, WalWriter};
use crate::storage::{segment, sync_dir};
use crate::topk::Hit;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Required to create a store; checked against an existing one.
    pub dim: Option<usize>,
    /// Used to create a store; checked against an existing one if given.
    pub metric: Option<Metric>,
    /// Open without the writer lock; writes fail with [`Error::ReadOnly`].
    pub read_only: bool,
    /// fsync the log after every write call (default). Without it a write
    /// survives a process crash but not a power loss.
    pub sync: bool,
    /// Checkpoint once the log exceeds this many bytes and the segment size.
    pub checkpoint_bytes: u64,
    /// From this many records on, unfiltered searches use an approximate
    /// SPANN index (memory mode) built on first use and kept current by
    /// every write; below it (and for every filtered or scoped search) the
    /// search is exact. `usize::MAX` keeps every search exact.
    pub ann_threshold: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            dim: None,
            metric: None,
            read_only: false,
            sync: true,
            checkpoint_bytes: 64 << 20,
            ann_threshold: DEFAULT_ANN_THRESHOLD,
        }
    }
}

/// Default size from which unfiltered searches go through SPANN.
pub const DEFAULT_ANN_THRESHOLD: usize = 100_000;

/// One record to insert; `None` fields take their defaults.
#[derive(Debug, Clone, Default)]
pub struct Insert {
    pub id: Option<u64>,
    pub text: Option<String>,
    pub metadata: Option<Value>,
    pub scope: Scope,
    pub importance: Option<f32>,
    pub created_at: Option<f64>,
}

/// Whether an insert may replace an existing id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    Add,
    Upsert,
}

/// How an `add` treats near-duplicates and links.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AddOptions {
    pub mode: WriteMode,
    /// Link each new record to up to `link_k` nearest records of its scope
    /// whose similarity is at least `link_threshold` (kind "similar").
    pub auto_link: bool,
    pub link_k: usize,
    pub link_threshold: f32,
    /// If set, a new vector whose cosine similarity to an existing record of
    /// the same scope is at least this is not inserted: the existing id is
    /// returned and reinforced (candidates come from LSH).
    pub dedupe: Option<f32>,
}

impl Default for AddOptions {
    fn default() -> Self {
        AddOptions {
            mode: WriteMode::Add,
            auto_link: false,
            link_k: 5,
            link_threshold: 0.75,
            dedupe: None,
        }
    }
}

/// LSH shape used for near-duplicate detection: 16 tables of 10 bits finds a
/// pair at cosine 0.9 with probability ~0.98 while each table lookup returns
/// about 0.1% of the records.
pub const DEDUPE_LSH: (usize, usize, u64) = (16, 10, 0x5EED);

/// How a recall ranks and expands.
#[derive(Debug, Clone, Default)]
pub struct RecallOptions {
    pub search: SearchOptions,
    pub now: f64,
    /// Rank by the decayed score instead of similarity alone.
    pub decay: bool,
    pub weights: Weights,
    /// Hops of links to follow from the hits (0: none).
    pub expand_links: usize,
}

/// One result of [`Store::recall`].
#[derive(Debug, Clone, PartialEq)]
pub struct RecallHit {
    pub id: u64,
    pub score: f32,
    pub similarity: f32,
    pub retention: f32,
    pub importance: f32,
    /// Reached through a link rather than by the search itself.
    pub expanded: bool,
    /// The hit whose link led here.
    pub via: Option<u64>,
}

/// Score factor of a record reached through a link of weight w: its parent's
/// score times w times this.
pub const LINK_DISCOUNT: f32 = 0.8;

/// What [`Store::forget`] did (or would do, with `dry_run`).
#[derive(Debug, Clone, PartialEq)]
pub struct ForgetReport {
    pub examined: usize,
    pub ids: Vec<u64>,
    pub retentions: Vec<f32>,
    pub archived: bool,
    pub dry_run: bool,
}

/// Restrictions applied inside a search.
#[derive(Debug, Clone, Default)]
pub struct SearchOptions {
    pub filter: Option<Filter>,
    pub scope: Scope,
    pub include_archived: bool,
    /// Force an exact search even above [`StoreOptions::ann_threshold`].
    pub exact: bool,
}

/// What [`Store::info`] and [`verify`] report.
#[derive(Debug, Clone, PartialEq)]
pub struct Info {
    pub path: PathBuf,
    pub dim: usize,
    pub metric: Metric,
    pub count: usize,
    pub generation: u64,
    pub segment_bytes: u64,
    pub wal_bytes: u64,
    pub wal_frames: usize,
    pub torn_bytes: u64,
    pub kernel: &'static str,
    /// "exact", "spann" or "spann-pending" (see [`Store::index_kind`]).
    pub index: &'static str,
}

pub fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn seg_name(gen: u64) -> String {
    format!("seg-{gen:06}.dat")
}

fn wal_name(gen: u64) -> String {
    format!("wal-{gen:06}.log")
}

fn is_store_file(name: &str) -> bool {
    (name.starts_with("seg-") && name.ends_with(".dat"))
        || (name.starts_with("wal-") && name.ends_with(".log"))
        || name == "MANIFEST.tmp"
}

/// The state a directory holds, loaded without side effects.
struct Loaded {
    manifest: Manifest,
    metric: Metric,
    records: HashMap<u64, Record>,
    vectors: FlatIndex,
    next_id: u64,
    segment_bytes: u64,
    replay: wal::Replay,
}

fn load(dir: &Path) -> Result<Loaded> {
    let manifest = manifest::read(dir)?;
    let mpath = dir.join(manifest::FILE);
    let metric =
        Metric::parse(&manifest.metric).map_err(|_| Error::corruption(&mpath, "unknown metric"))?;
    if manifest.dim == 0 {
        return Err(Error::corruption(&mpath, "dimension 0"));
    }
    let dim = manifest.dim;
    let mut records = HashMap::new();
    let mut vectors = FlatIndex::new(dim, metric);
    let mut segment_bytes = 0;
    if let Some(seg) = &manifest.segment {
        let p = dir.join(seg);
        segment_bytes = std::fs::metadata(&p).at(&p)?.len();
        let s = segment::read(&p)?;
        if s.dim != dim || s.metric != metric {
            return Err(Error::corruption(
                &p,
                "dimension or metric differs from the manifest",
            ));
        }
        vectors = FlatIndex::with_capacity(dim, metric, s.records.len());
        let ids: Vec<u64> = s.records.iter().map(|r| r.id).collect();
        vectors.upsert(&ids, &s.vectors);
        records.reserve(s.records.len());
        for r in s.records {
            records.insert(r.id, r);
        }
    }
    let wpath = dir.join(&manifest.wal);
    let replay = wal::replay(&wpath, dim)?;
    if replay.generation != manifest.generation {
        return Err(Error::corruption(
            &wpath,
            "log generation differs from the manifest",
        ));
    }
    let mut next_id = manifest.next_id;
    let mut state = State {
        records: &mut records,
        vectors: &mut vectors,
        lsh: None,
    };
    for op in &replay.ops {
        if let WalOp::Put { records, .. } = op {
            next_id = next_id.max(
                records
                    .iter()
                    .map(|r| r.id.saturating_add(1))
                    .max()
                    .unwrap_or(0),
            );
        }
        state.apply(op.clone());
    }
    links::repair(&mut records);
    Ok(Loaded {
        manifest,
        metric,
        records,
        vectors,
        next_id,
        segment_bytes,
        replay,
    })
}

/// Loading with retries: a read-only handle can race a writer's checkpoint
/// deleting the files the manifest it read named.
fn load_retrying(dir: &Path, retries: usize) -> Result<Loaded> {
    let mut attempt = 0;
    loop {
        match load(dir) {
            Err(Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound && attempt < retries =>
            {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// The in-memory state that log operations apply to.
struct State<'a> {
    records: &'a mut HashMap<u64, Record>,
    vectors: &'a mut FlatIndex,
    lsh: Option<&'a mut LshTables>,
}

impl State<'_> {
    fn apply(&mut self, op: WalOp) {
        match op {
            WalOp::Put { records, vectors } => {
                let ids: Vec<u64> = records.iter().map(|r| r.id).collect();
                self.vectors.upsert(&ids, &vectors);
                if let Some(lsh) = self.lsh.as_deref_mut() {
                    let d = lsh.dim();
                    for (i, &id) in ids.iter().enumerate() {
                        lsh.insert(id, &vectors[i * d..(i + 1) * d]);
                    }
                }
                for r in records {
                    self.records.insert(r.id, r);
                }
            }
            WalOp::Patch { records } => {
                for r in records {
                    if self.records.contains_key(&r.id) {
                        self.records.insert(r.id, r);
                    }
                }
            }
            WalOp::Delete { ids } => {
                self.vectors.remove(&ids);
                if let Some(lsh) = self.lsh.as_deref_mut() {
                    ids.iter().for_each(|&id| lsh.remove(id));
                }
                for id in &ids {
                    if let Some(r) = self.records.remove(id) {
                        for l in r.links {
                            if let Some(t) = self.records.get_mut(&l.target) {
                                t.links.retain(|x| x.target != *id);
                            }
                        }
                    }
                }
            }
            WalOp::Touch { touches } => {
                for t in touches {
                    if let Some(r) = self.records.get_mut(&t.id) {
                        r.last_access = t.last_access;
                        r.strength = t.strength;
                        r.access_count = t.access_count;
                    }
                }
            }
        }
    }
}

/// A store of vectors and records in one directory.
pub struct Store {
    dir: PathBuf,
    dim: usize,
    metric: Metric,
    opts: StoreOptions,
    manifest: Manifest,
    records: HashMap<u64, Record>,
    vectors: FlatIndex,
    next_id: u64,
    wal: Option<WalWriter>,
    wal_frames: usize,
    torn_bytes: u64,
    segment_bytes: u64,
    _lock: Option<WriterLock>,
    /// Built on the first `add` with `dedupe`, then kept current.
    lsh: Option<LshTables>,
    /// The forgetting curve and how recalls reinforce.
    pub decay: DecayPolicy,
    /// Most links one record keeps.
    pub max_degree: usize,
    /// Bumped by every applied write; keys the filter cache.
    write_gen: u64,
    /// The rows matching the last filtered search's restrictions, so a
    /// repeated filter or scope costs a gather-scan of its rows only.
    subset_cache: std::sync::Mutex<Option<SubsetCache>>,
    /// (write generation, whether any record is archived then).
    archived_cache: std::sync::Mutex<(u64, bool)>,
    /// The approximate index, once the store is big enough (see
    /// [`StoreOptions::ann_threshold`]); never persisted, rebuilt on demand.
    /// Searches read it without locking; only `commit` (with `&mut self`)
    /// changes it after it is set.
    ann: std::sync::OnceLock<SpannIndex>,
    /// Held (only ever with `try_lock`) by the one search building `ann`.
    ann_building: std::sync::Mutex<()>,
}

#[derive(Debug)]
struct SubsetCache {
    key: String,
    write_gen: u64,
    rows: std::sync::Arc<Vec<usize>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("dim", &self.dim)
            .field("metric", &self.metric)
            .field("count", &self.records.len())
            .finish()
    }
}

impl Store {
    /// Open the store in `dir`, creating it if it does not exist and
    /// `opts.dim` is given.
    pub fn open(dir: impl AsRef<Path>, opts: StoreOptions) -> Result<Store> {
        let dir = dir.as_ref().to_path_buf();
        let exists = dir.join(manifest::FILE).exists();
        if !exists {
            if opts.read_only {
                return Err(Error::InvalidArgument(format!(
                    "no engramdb store at {}",
                    dir.display()
                )));
            }
            return Self::create(dir, opts);
        }
        let lock = if opts.read_only {
            None
        } else {
            Some(WriterLock::acquire(&dir)?)
        };
        let loaded = if opts.read_only {
            load_retrying(&dir, 5)?
        } else {
            load(&dir)?
        };
        if let Some(d) = opts.dim {
            if d != loaded.manifest.dim {
                return Err(Error::DimensionMismatch {
                    expected: loaded.manifest.dim,
                    got: d,
                });
            }
        }
        if let Some(m) = opts.metric {
            if m != loaded.metric {
                return Err(Error::InvalidArgument(format!(
                    "store {} uses metric {}, not {}",
                    dir.display(),
                    loaded.metric.name(),
                    m.name()
                )));
            }
        }
        let mut wal = None;
        if !opts.read_only {
            let wpath = dir.join(&loaded.manifest.wal);
            wal = Some(WalWriter::open_append(
                &wpath,
                loaded.replay.valid_len,
                opts.sync,
            )?);
            remove_unreferenced(&dir, &loaded.manifest)?;
        }
        Ok(Store {
            dim: loaded.manifest.dim,
            metric: loaded.metric,
            next_id: loaded.next_id,
            records: loaded.records,
            vectors: loaded.vectors,
            wal_frames: loaded.replay.ops.len(),
            torn_bytes: loaded.replay.torn_bytes,
            segment_bytes: loaded.segment_bytes,
            manifest: loaded.manifest,
            wal,
            dir,
            opts,
            _lock: lock,
            lsh: None,
            decay: DecayPolicy::default(),
            max_degree: DEFAULT_MAX_DEGREE,
            write_gen: 0,
            subset_cache: Default::default(),
            archived_cache: std::sync::Mutex::new((u64::MAX, false)),
            ann: std::sync::OnceLock::new(),
            ann_building: std::sync::Mutex::new(()),
        })
    }

    fn create(dir: PathBuf, opts: StoreOptions) -> Result<Store> {
        let dim = opts.dim.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "no engramdb store at {}; pass dim to create one",
                dir.display()
            ))
        })?;
        if dim == 0 {
            return Err(Error::InvalidArgument("dim must be at least 1".into()));
        }
        let metric = opts.metric.unwrap_or(Metric::Cosine);
        std::fs::create_dir_all(&dir).at(&dir)?;
        let lock = WriterLock::acquire(&dir)?;
        if dir.join(manifest::FILE).exists() {
            // another writer created it between our check and our lock
            drop(lock);
            return Self::open(dir, opts);
        }
        // Without a manifest nothing here was ever acknowledged: clear
        // leftovers of a creation that crashed.
        for entry in std::fs::read_dir(&dir).at(&dir)? {
            let entry = entry.at(&dir)?;
            if let Some(name) = entry.file_name().to_str() {
                if is_store_file(name) {
                    std::fs::remove_file(entry.path()).at(entry.path())?;
                }
            }
        }
        let generation = 1;
        let wal = WalWriter::create(&dir.join(wal_name(generation)), generation, opts.sync)?;
        let manifest = Manifest {
            dim,
            metric: metric.name().into(),
            generation,
            segment: None,
            wal: wal_name(generation),
            next_id: 0,
            writer: format!("engramdb {}", env!("CARGO_PKG_VERSION")),
        };
        manifest::write_atomic(&dir, &manifest)?;
        Ok(Store {
            dim,
            metric,
            opts,
            manifest,
            records: HashMap::new(),
            vectors: FlatIndex::new(dim, metric),
            next_id: 0,
            wal: Some(wal),
            wal_frames: 0,
            torn_bytes: 0,
            segment_bytes: 0,
            _lock: Some(lock),
            dir,
            lsh: None,
            decay: DecayPolicy::default(),
            max_degree: DEFAULT_MAX_DEGREE,
            write_gen: 0,
            subset_cache: Default::default(),
            archived_cache: std::sync::Mutex::new((u64::MAX, false)),
            ann: std::sync::OnceLock::new(),
            ann_building: std::sync::Mutex::new(()),
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn metric(&self) -> Metric {
        self.metric
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn read_only(&self) -> bool {
        self.wal.is_none()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.records.contains_key(&id)
    }

    /// All ids, in no particular order.
    pub fn ids(&self) -> Vec<u64> {
        self.vectors.ids().to_vec()
    }

    /// The ids a search with `opts` may return (its filter, scope and
    /// archived rule), ascending. The one place callers evaluate a filter
    /// without searching, so the grammar lives only in [`Filter`].
    pub fn matching_ids(&self, opts: &SearchOptions) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .records
            .values()
            .filter(|r| self.visible(r, opts))
            .map(|r| r.id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Those of `ids` a search with `opts` may return, in their given order
    /// (unknown ids are dropped): [`Store::matching_ids`] for a few
    /// candidates, without a scan of every record.
    pub fn matching_among(&self, ids: &[u64], opts: &SearchOptions) -> Vec<u64> {
        ids.iter()
            .copied()
            .filter(|id| self.records.get(id).is_some_and(|r| self.visible(r, opts)))
            .collect()
    }

    /// Check a batch of vectors and return them prepared for the index.
    fn prepare(&self, vectors: &[f32], n: usize) -> Result<Vec<f32>> {
        if n == 0 {
            return Err(Error::EmptyInput("no vectors given".into()));
        }
        if vectors.len() != n * self.dim {
            return Err(Error::DimensionMismatch {
                expected: self.dim,
                got: vectors.len() / n,
            });
        }
        distance::check_finite(vectors, self.dim)?;
        let mut v = vectors.to_vec();
        if self.metric.normalizes() {
            for row in v.chunks_exact_mut(self.dim) {
                distance::normalize(row)?;
            }
        }
        Ok(v)
    }

    fn writer(&mut self) -> Result<&mut WalWriter> {
        self.wal.as_mut().ok_or(Error::ReadOnly)
    }

    /// Log `ops`, then apply them. Nothing is applied if logging fails.
    fn commit(&mut self, ops: Vec<WalOp>) -> Result<()> {
        self.writer()?.append(&ops)?;
        self.wal_frames += ops.len();
        self.write_gen += 1;
        let mut state = State {
            records: &mut self.records,
            vectors: &mut self.vectors,
            lsh: self.lsh.as_mut(),
        };
        let mut ann = self.ann.get_mut();
        for op in ops {
            if let Some(ann) = ann.as_deref_mut() {
                match &op {
                    WalOp::Put { records, vectors } => {
                        let ids: Vec<u64> = records.iter().map(|r| r.id).collect();
                        VectorIndex::upsert(ann, &ids, vectors);
                    }
                    WalOp::Delete { ids } => ann.remove(ids),
                    _ => {}
                }
            }
            state.apply(op);
        }
        self.maybe_checkpoint()
    }

    /// Insert records with their vectors (`vectors` is `items.len() * dim`
    /// floats, row-major). Returns the ids, assigned where not given.
    pub fn add(
        &mut self,
        vectors: &[f32],
        items: Vec<Insert>,
        mode: WriteMode,
        now: f64,
    ) -> Result<Vec<u64>> {
        let opts = AddOptions {
            mode,
            ..Default::default()
        };
        self.add_with(vectors, items, &opts, now)
    }

    /// [`Store::add`] with near-duplicate detection and auto-linking.
    pub fn add_with(
        &mut self,
        vectors: &[f32],
        items: Vec<Insert>,
        opts: &AddOptions,
        now: f64,
    ) -> Result<Vec<u64>> {
        self.writer()?;
        let mode = opts.mode;
        let n = items.len();
        if let Some(t) = opts.dedupe {
            if !(t.is_finite() && (-1.0..=1.0).contains(&t)) {
                return Err(Error::InvalidArgument(format!(
                    "dedupe threshold must be in [-1, 1], got {t}"
                )));
            }
        }
        if opts.auto_link && !opts.link_threshold.is_finite() {
            return Err(Error::InvalidArgument(
                "link_threshold must be finite".into(),
            ));
        }
        let prepared = self.prepare(vectors, n)?;
        // near-duplicates: for each position of the batch, the existing id it repeats
        let mut dup_of: Vec<Option<u64>> = vec![None; n];
        if let Some(t) = opts.dedupe {
            self.ensure_lsh();
            for (i, it) in items.iter().enumerate() {
                if it.id.is_some_and(|id| self.records.contains_key(&id)) {
                    continue; // an explicit existing id is an explicit write
                }
                dup_of[i] =
                    self.near_duplicate(&prepared[i * self.dim..(i + 1) * self.dim], &it.scope, t);
            }
        }
        if dup_of.iter().any(|d| d.is_some()) {
            let keep: Vec<usize> = (0..n).filter(|&i| dup_of[i].is_none()).collect();
            let mut fresh_ids = Vec::new();
            if !keep.is_empty() {
                let mut kept_vecs = Vec::with_capacity(keep.len() * self.dim);
                let mut kept_items = Vec::with_capacity(keep.len());
                let mut items: Vec<Option<Insert>> = items.into_iter().map(Some).collect();
                for &i in &keep {
                    kept_vecs.extend_from_slice(&vectors[i * self.dim..(i + 1) * self.dim]);
                    kept_items.push(items[i].take().unwrap());
                }
                let inner = AddOptions {
                    dedupe: None,
                    ..*opts
                };
                fresh_ids = self.add_with(&kept_vecs, kept_items, &inner, now)?;
            }
            let mut dups: Vec<u64> = dup_of.iter().flatten().copied().collect();
            dups.sort_unstable();
            dups.dedup();
            self.reinforce(&dups, now)?;
            let mut fresh = fresh_ids.into_iter();
            return Ok(dup_of
                .iter()
                .map(|d| d.unwrap_or_else(|| fresh.next().unwrap()))
                .collect());
        }
        let mut seen = HashSet::with_capacity(n);
        let mut next = self.next_id;
        let mut records = Vec::with_capacity(n);
        for it in items {
            let id = match it.id {
                Some(id) => id,
                None => {
                    while self.records.contains_key(&next) || seen.contains(&next) {
                        next += 1;
                    }
                    next
                }
            };
            if id == u64::MAX {
                return Err(Error::InvalidArgument("id 2**64-1 is reserved".into()));
            }
            if !seen.insert(id) {
                return Err(Error::DuplicateId(id));
            }
            let existing = self.records.get(&id);
            if existing.is_some() && mode == WriteMode::Add {
                return Err(Error::DuplicateId(id));
            }
            if let Some(m) = &it.metadata {
                if !m.is_object() {
                    return Err(Error::InvalidArgument(format!(
                        "metadata of id {id} must be a JSON object"
                    )));
                }
            }
            if let Some(imp) = it.importance {
                if !(imp.is_finite() && (0.0..=1.0).contains(&imp)) {
                    return Err(Error::InvalidArgument(format!(
                        "importance must be in [0, 1], got {imp}"
                    )));
                }
            }
            let mut r = match existing {
                // an upsert keeps the memory's history: creation time, strength, access, links
                Some(old) => old.clone(),
                None => Record::new(id, it.created_at.unwrap_or(now)),
            };
            r.text = it.text;
            r.metadata = it.metadata;
            r.scope = it.scope;
            if let Some(imp) = it.importance {
                r.importance = imp;
            }
            if let Some(c) = it.created_at {
                r.created_at = c;
            }
            r.updated_at = now;
            records.push(r);
        }
        let ids: Vec<u64> = records.iter().map(|r| r.id).collect();
        let ops = chunk_puts(records, prepared, self.dim);
        self.commit(ops)?;
        self.next_id = self.next_id.max(ids.iter().max().map_or(0, |m| m + 1));
        if opts.auto_link {
            self.auto_link(&ids, opts.link_k, opts.link_threshold)?;
        }
        Ok(ids)
    }

    fn ensure_lsh(&mut self) {
        if self.lsh.is_some() {
            return;
        }
        let (t, b, seed) = DEDUPE_LSH;
        let mut lsh = LshTables::new(self.dim, t, b, seed).expect("valid LSH shape");
        for &id in self.vectors.ids() {
            let mut u = self.vectors.vector(id).unwrap().to_vec();
            if self.metric.normalizes() || distance::normalize(&mut u).is_ok() {
                lsh.insert(id, &u);
            }
        }
        self.lsh = Some(lsh);
    }

    /// The most similar existing record of exactly this scope with cosine
    /// similarity >= `threshold`, among the LSH candidates.
    fn near_duplicate(&self, v: &[f32], scope: &Scope, threshold: f32) -> Option<u64> {
        let lsh = self.lsh.as_ref()?;
        let mut u = v.to_vec();
        if !self.metric.normalizes() && distance::normalize(&mut u).is_err() {
            return None;
        }
        let mut best: Option<(f32, u64)> = None;
        for id in lsh.candidates(&u) {
            let r = &self.records[&id];
            if r.archived || &r.scope != scope {
                continue;
            }
            let w = self.vectors.vector(id).unwrap();
            let norm = if self.metric.normalizes() {
                1.0
            } else {
                distance::dot(w, w).sqrt()
            };
            if norm == 0.0 {
                continue;
            }
            let cos = distance::dot(&u, w) / norm;
            if cos >= threshold && best.is_none_or(|(b, bid)| cos > b || (cos == b && id < bid)) {
                best = Some((cos, id));
            }
        }
        best.map(|(_, id)| id)
    }

    fn auto_link(&mut self, ids: &[u64], k: usize, threshold: f32) -> Result<()> {
        // changed records so far: links made earlier in this batch compose
        let mut overlay: HashMap<u64, Record> = HashMap::new();
        for &id in ids {
            let scope = self.records[&id].scope.clone();
            let v = self.vectors.vector(id).unwrap().to_vec();
            let pred = |other: u64| {
                other != id
                    && self
                        .records
                        .get(&other)
                        .is_some_and(|r| !r.archived && r.scope == scope)
            };
            let hits = self
                .vectors
                .search(&v, k, Some(&pred))
                .pop()
                .unwrap_or_default();
            for h in hits.into_iter().filter(|h| h.score >= threshold) {
                let view = |x: u64| overlay.get(&x).or_else(|| self.records.get(&x)).cloned();
                let mut local: HashMap<u64, Record> = HashMap::new();
                for x in [id, h.id] {
                    if let Some(r) = view(x) {
                        local.insert(x, r);
                    }
                }
                let neighbours: Vec<u64> = local
                    .values()
                    .flat_map(|r| r.links.iter().map(|l| l.target))
                    .collect();
                for l in neighbours {
                    if let Some(r) = view(l) {
                        local.entry(l).or_insert(r);
                    }
                }
                for r in links::link_pair(&local, id, h.id, "similar", h.score, self.max_degree) {
                    overlay.insert(r.id, r);
                }
            }
        }
        if overlay.is_empty() {
            return Ok(());
        }
        let mut changed: Vec<Record> = overlay.into_values().collect();
        changed.sort_by_key(|r| r.id);
        self.commit(vec![WalOp::Patch { records: changed }])
    }

    /// Link `a` and `b` both ways (replacing an existing link's kind and weight).
    pub fn link(&mut self, a: u64, b: u64, kind: &str, weight: f32) -> Result<()> {
        self.writer()?;
        for id in [a, b] {
            if !self.records.contains_key(&id) {
                return Err(Error::NotFound(id));
            }
        }
        if a == b {
            return Err(Error::InvalidArgument(format!("cannot link {a} to itself")));
        }
        if !weight.is_finite() {
            return Err(Error::InvalidArgument("link weight must be finite".into()));
        }
        let changed = links::link_pair(&self.records, a, b, kind, weight, self.max_degree);
        self.commit(vec![WalOp::Patch { records: changed }])
    }

    /// Remove the link between `a` and `b`; returns whether there was one.
    pub fn unlink(&mut self, a: u64, b: u64) -> Result<bool> {
        self.writer()?;
        for id in [a, b] {
            if !self.records.contains_key(&id) {
                return Err(Error::NotFound(id));
            }
        }
        let changed = links::unlink_pair(&self.records, a, b);
        if changed.is_empty() {
            return Ok(false);
        }
        self.commit(vec![WalOp::Patch { records: changed }])?;
        Ok(true)
    }

    /// Retention of each id at `now`.
    pub fn retention(&self, ids: &[u64], now: f64) -> Result<Vec<f32>> {
        ids.iter()
            .map(|id| {
                let r = self.records.get(id).ok_or(Error::NotFound(*id))?;
                Ok(self.decay.retention(r, now))
            })
            .collect()
    }

    /// Reinforce ids as recalled at `now` (strength up, clock reset).
    pub fn reinforce(&mut self, ids: &[u64], now: f64) -> Result<()> {
        let touches = ids
            .iter()
            .map(|id| {
                let r = self.records.get(id).ok_or(Error::NotFound(*id))?;
                Ok(self.decay.reinforce(r, now))
            })
            .collect::<Result<Vec<_>>>()?;
        self.touch(touches)
    }

    fn visible(&self, r: &Record, opts: &SearchOptions) -> bool {
        (opts.include_archived || !r.archived)
            && r.scope.visible_to(&opts.scope)
            && opts
                .filter
                .as_ref()
                .is_none_or(|f| f.matches(r.metadata.as_ref()))
    }

    /// Search one query and rank by similarity, or with `decay` by the mixed
    /// score of [`crate::memory::decay`]; then follow links. The decayed
    /// top-k is exact: the candidate pool grows until no record outside it
    /// could outscore the k-th hit.
    pub fn recall(&self, query: &[f32], k: usize, opts: &RecallOptions) -> Result<Vec<RecallHit>> {
        if k == 0 {
            return Err(Error::InvalidArgument("k must be at least 1".into()));
        }
        let q = self.prepare(query, 1)?;
        let score_of = |id: u64, sim: f32| {
            let r = &self.records[&id];
            let ret = self.decay.retention(r, opts.now);
            RecallHit {
                id,
                score: if opts.decay {
                    opts.weights.score(sim, ret, r.importance)
                } else {
                    sim
                },
                similarity: self.metric.user_score(sim),
                retention: ret,
                importance: r.importance,
                expanded: false,
                via: None,
            }
        };
        let by_score =
            |a: &RecallHit, b: &RecallHit| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id));
        let mut pool = if opts.decay { (4 * k).max(32) } else { k };
        // recall is exact at any size: the pool argument relies on it
        let sopts = SearchOptions {
            exact: true,
            ..opts.search.clone()
        };
        let mut hits = loop {
            let raw = self.search(&q, 1, pool, &sopts)?.pop().unwrap_or_default();
            let exhausted = raw.len() < pool;
            let lowest_sim = raw.last().map_or(f32::NEG_INFINITY, |h| h.score);
            let mut scored: Vec<RecallHit> = raw.iter().map(|h| score_of(h.id, h.score)).collect();
            scored.sort_by(by_score);
            scored.truncate(k);
            let kth = scored.last().map_or(f32::NEG_INFINITY, |h| h.score);
            let bound = opts.weights.similarity * lowest_sim + opts.weights.max_bonus();
            if !opts.decay || exhausted || (scored.len() == k && kth >= bound) {
                break scored;
            }
            pool *= 4;
        };
        let mut seen: HashSet<u64> = hits.iter().map(|h| h.id).collect();
        let mut frontier: Vec<RecallHit> = hits.clone();
        for _ in 0..opts.expand_links {
            let mut next = Vec::new();
            for parent in &frontier {
                for l in &self.records[&parent.id].links {
                    let Some(r) = self.records.get(&l.target) else {
                        continue;
                    };
                    if seen.contains(&l.target) || !self.visible(r, &opts.search) {
                        continue;
                    }
                    seen.insert(l.target);
                    let sim = self
                        .metric
                        .similarity(&q, self.vectors.vector(l.target).unwrap());
                    let mut h = score_of(l.target, sim);
                    h.score = parent.score * l.weight * LINK_DISCOUNT;
                    h.expanded = true;
                    h.via = Some(parent.id);
                    next.push(h);
                }
            }
            hits.extend(next.iter().cloned());
            frontier = next;
        }
        hits.sort_by(by_score);
        Ok(hits)
    }

    /// Archive (or delete) every visible record whose retention at `now` is
    /// below `threshold`. With `dry_run` nothing changes; the report says
    /// what would have.
    pub fn forget(
        &mut self,
        threshold: f32,
        now: f64,
        delete: bool,
        dry_run: bool,
        scope: &SearchOptions,
    ) -> Result<ForgetReport> {
        if !dry_run {
            self.writer()?;
        }
        let mut examined = 0;
        let mut victims: Vec<(u64, f32)> = Vec::new();
        for r in self.records.values() {
            if !self.visible(r, scope) || (!delete && r.archived) {
                continue;
            }
            examined += 1;
            let ret = self.decay.retention(r, now);
            if ret < threshold {
                victims.push((r.id, ret));
            }
        }
        victims.sort_by_key(|v| v.0);
        let ids: Vec<u64> = victims.iter().map(|v| v.0).collect();
        if !dry_run && !ids.is_empty() {
            if delete {
                self.delete(&ids)?;
            } else {
                let recs = ids
                    .iter()
                    .map(|id| {
                        let mut r = self.records[id].clone();
                        r.archived = true;
                        r
                    })
                    .collect();
                self.patch(recs)?;
            }
        }
        Ok(ForgetReport {
            examined,
            retentions: victims.iter().map(|v| v.1).collect(),
            ids,
            archived: !delete,
            dry_run,
        })
    }

    /// Delete ids. Every id must exist (checked before anything changes).
    pub fn delete(&mut self, ids: &[u64]) -> Result<usize> {
        self.writer()?;
        if ids.is_empty() {
            return Ok(0);
        }
        let mut uniq = Vec::with_capacity(ids.len());
        let mut seen = HashSet::with_capacity(ids.len());
        for &id in ids {
            if !self.records.contains_key(&id) {
                return Err(Error::NotFound(id));
            }
            if seen.insert(id) {
                uniq.push(id);
            }
        }
        let n = uniq.len();
        self.commit(vec![WalOp::Delete { ids: uniq }])?;
        Ok(n)
    }

    /// Replace records' attributes (text, metadata, links, memory state)
    /// without touching their vectors. Every id must exist.
    pub fn patch(&mut self, records: Vec<Record>) -> Result<()> {
        self.writer()?;
        for r in &records {
            if !self.records.contains_key(&r.id) {
                return Err(Error::NotFound(r.id));
            }
        }
        if records.is_empty() {
            return Ok(());
        }
        self.commit(vec![WalOp::Patch { records }])
    }

    /// Record accesses (reinforcement of the forgetting curve).
    pub fn touch(&mut self, touches: Vec<Touch>) -> Result<()> {
        self.writer()?;
        for t in &touches {
            if !self.records.contains_key(&t.id) {
                return Err(Error::NotFound(t.id));
            }
        }
        if touches.is_empty() {
            return Ok(());
        }
        self.commit(vec![WalOp::Touch { touches }])
    }

    pub fn get(&self, id: u64) -> Result<(&Record, &[f32])> {
        let r = self.records.get(&id).ok_or(Error::NotFound(id))?;
        let v = self.vectors.vector(id).expect("every record has a vector");
        Ok((r, v))
    }

    pub fn record(&self, id: u64) -> Option<&Record> {
        self.records.get(&id)
    }

    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.records.values()
    }

    /// Exact top-`k` for each query (row-major, `dim` wide). Similarities are
    /// "higher is closer" (see [`Metric::user_score`] for the public score).
    pub fn search(
        &self,
        queries: &[f32],
        m: usize,
        k: usize,
        opts: &SearchOptions,
    ) -> Result<Vec<Vec<Hit>>> {
        if k == 0 {
            return Err(Error::InvalidArgument("k must be at least 1".into()));
        }
        let q = self.prepare(queries, m)?;
        let hide_archived = !opts.include_archived && self.has_archived();
        if opts.filter.is_none() && opts.scope.is_empty() && !hide_archived {
            if self.records.len() >= self.opts.ann_threshold && !opts.exact {
                return self.search_ann(&q, k);
            }
            return Ok(self.vectors.search(&q, k, None));
        }
        let key = format!("{opts:?}");
        // never hold the cache lock across parallel work: a rayon worker
        // waiting on its sub-tasks may run another search that wants it
        let cached = self
            .subset_cache
            .lock()
            .unwrap()
            .as_ref()
            .filter(|c| c.key == key && c.write_gen == self.write_gen)
            .map(|c| c.rows.clone());
        let rows = match cached {
            Some(rows) => rows,
            None => {
                let pred = |id: u64| self.records.get(&id).is_some_and(|r| self.visible(r, opts));
                let rows = std::sync::Arc::new(self.vectors.rows_matching(&pred));
                *self.subset_cache.lock().unwrap() = Some(SubsetCache {
                    key,
                    write_gen: self.write_gen,
                    rows: rows.clone(),
                });
                rows
            }
        };
        Ok(self.vectors.search_rows(&q, k, &rows))
    }

    /// Search the SPANN index, building it first if this is its first use.
    ///
    /// Never blocks on another search: this runs inside the rayon pool, and
    /// a worker blocked on a lock whose holder waits for parallel sub-tasks
    /// (the build, or a search) can be the worker those sub-tasks need, so
    /// both would wait forever. While one search builds the index, the others
    /// scan exactly instead of waiting for it.
    fn search_ann(&self, q: &[f32], k: usize) -> Result<Vec<Vec<Hit>>> {
        if let Some(ann) = self.ann.get() {
            return ann.search_prepared(q, k, &ann.search_defaults(), None);
        }
        let _building = match self.ann_building.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                return Ok(self.vectors.search(q, k, None));
            }
        };
        if self.ann.get().is_none() {
            let ann = SpannIndex::build(
                self.vectors.data(),
                self.dim,
                Some(self.vectors.ids()),
                self.metric,
                SpannParams::default(),
                None,
            )?;
            // only the holder of `ann_building` sets it: this never waits
            let _ = self.ann.set(ann);
        }
        let ann = self.ann.get().expect("set above");
        ann.search_prepared(q, k, &ann.search_defaults(), None)
    }

    /// Which index unfiltered searches use now: "exact", "spann" (built) or
    /// "spann-pending" (big enough; built by the next unfiltered search).
    pub fn index_kind(&self) -> &'static str {
        if self.ann.get().is_some() {
            "spann"
        } else if self.records.len() >= self.opts.ann_threshold {
            "spann-pending"
        } else {
            "exact"
        }
    }

    /// Whether any record is archived (cached until the next write).
    fn has_archived(&self) -> bool {
        let mut c = self.archived_cache.lock().unwrap();
        if c.0 != self.write_gen {
            *c = (self.write_gen, self.records.values().any(|r| r.archived));
        }
        c.1
    }

    fn maybe_checkpoint(&mut self) -> Result<()> {
        let wal_len = self.wal.as_ref().map_or(0, |w| w.len());
        if wal_len > self.opts.checkpoint_bytes.max(self.segment_bytes) {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Write every live record to a new segment, start a new log, and commit
    /// both by replacing the manifest. Old files are removed afterwards.
    pub fn checkpoint(&mut self) -> Result<()> {
        self.writer()?;
        // a manifest whose generation cannot grow is a corrupted one (real
        // stores count from 1): refuse it rather than overflow
        let gen = self.manifest.generation.checked_add(1).ok_or_else(|| {
            Error::corruption(
                self.dir.join(crate::storage::manifest::FILE),
                "generation cannot grow",
            )
        })?;
        let seg = seg_name(gen);
        let recs: Vec<&Record> = self
            .vectors
            .ids()
            .iter()
            .map(|id| &self.records[id])
            .collect();
        // Until the manifest names them the new files are garbage: on a
        // failure (a full disk) remove them at once rather than leave them
        // holding the space the next attempt needs.
        let discard = |dir: &Path| {
            let _ = std::fs::remove_file(dir.join(seg_name(gen)));
            let _ = std::fs::remove_file(dir.join(wal_name(gen)));
            let _ = std::fs::remove_file(dir.join("MANIFEST.tmp"));
        };
        let seg_bytes = segment::write(
            &self.dir.join(&seg),
            gen,
            self.dim,
            self.metric,
            &recs,
            self.vectors.data(),
        )
        .inspect_err(|_| discard(&self.dir))?;
        crate::fault::crash_point("checkpoint-segment-written");
        let new_wal = WalWriter::create(&self.dir.join(wal_name(gen)), gen, self.opts.sync)
            .inspect_err(|_| discard(&self.dir))?;
        crate::fault::crash_point("checkpoint-wal-created");
        let manifest = Manifest {
            generation: gen,
            segment: Some(seg),
            wal: wal_name(gen),
            next_id: self.next_id,
            writer: format!("engramdb {}", env!("CARGO_PKG_VERSION")),
            ..self.manifest.clone()
        };
        if let Err(e) = manifest::write_atomic(&self.dir, &manifest) {
            // the rename may have happened (only the directory sync failed):
            // the new files are garbage only if the manifest is still the old one
            if manifest::read(&self.dir).is_ok_and(|m| m.generation < gen) {
                discard(&self.dir);
            }
            return Err(e);
        }
        self.manifest = manifest;
        self.wal = Some(new_wal);
        self.wal_frames = 0;
        self.torn_bytes = 0;
        self.segment_bytes = seg_bytes;
        crate::fault::crash_point("checkpoint-committed");
        remove_unreferenced(&self.dir, &self.manifest)
    }

    /// Make everything durable and compact the log into a segment.
    pub fn flush(&mut self) -> Result<()> {
        if self.wal.as_ref().is_some_and(|w| !w.is_empty()) {
            self.checkpoint()?;
        }
        Ok(())
    }

    pub fn info(&self) -> Info {
        Info {
            path: self.dir.clone(),
            dim: self.dim,
            metric: self.metric,
            count: self.records.len(),
            generation: self.manifest.generation,
            segment_bytes: self.segment_bytes,
            wal_bytes: self.wal.as_ref().map(|w| w.len()).unwrap_or_else(|| {
                std::fs::metadata(self.dir.join(&self.manifest.wal)).map_or(0, |m| m.len())
            }),
            wal_frames: self.wal_frames,
            torn_bytes: self.torn_bytes,
            kernel: distance::kernel_name(),
            index: self.index_kind(),
        }
    }
}

/// Split a batch into log frames that stay under the frame size limit.
fn chunk_puts(records: Vec<Record>, vectors: Vec<f32>, dim: usize) -> Vec<WalOp> {
    let budget = wal::MAX_FRAME / 2;
    let mut ops = Vec::new();
    let mut cur: Vec<Record> = Vec::new();
    let mut size = 0usize;
    let mut start = 0usize;
    for r in records {
        let est = dim * 4
            + 160
            + r.text.as_ref().map_or(0, |t| t.len())
            + r.metadata.as_ref().map_or(0, |m| m.to_string().len())
            + r.links.len() * 32;
        if !cur.is_empty() && size + est > budget {
            let end = start + cur.len();
            ops.push(WalOp::Put {
                records: std::mem::take(&mut cur),
                vectors: vectors[start * dim..end * dim].to_vec(),
            });
            start = end;
            size = 0;
        }
        size += est;
        cur.push(r);
    }
    if !cur.is_empty() {
        let end = start + cur.len();
        ops.push(WalOp::Put {
            records: cur,
            vectors: vectors[start * dim..end * dim].to_vec(),
        });
    }
    ops
}

fn remove_unreferenced(dir: &Path, m: &Manifest) -> Result<()> {
    let mut removed = false;
    for entry in std::fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_store_file(name) && Some(name) != m.segment.as_deref() && name != m.wal {
            std::fs::remove_file(entry.path()).at(entry.path())?;
            removed = true;
        }
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Check every file of the store in `dir` (checksums, structure, log
/// frames) without taking the writer lock or changing anything.
pub fn verify(dir: &Path) -> Result<Info> {
    let loaded = load_retrying(dir, 5)?;
    let wal_bytes = loaded.replay.valid_len + loaded.replay.torn_bytes;
    debug_assert!(wal_bytes >= HEADER_LEN as u64);
    for id in loaded.records.keys() {
        if !loaded.vectors.contains(*id) {
            return Err(Error::corruption(dir, format!("record {id} has no vector")));
        }
    }
    Ok(Info {
        path: dir.to_path_buf(),
        dim: loaded.manifest.dim,
        metric: loaded.metric,
        count: loaded.records.len(),
        generation: loaded.manifest.generation,
        segment_bytes: loaded.segment_bytes,
        wal_bytes,
        wal_frames: loaded.replay.ops.len(),
        torn_bytes: loaded.replay.torn_bytes,
        kernel: distance::kernel_name(),
        index: "exact",
    })
}

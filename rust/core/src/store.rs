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
use crate::index::VectorIndex;
use crate::memory::{Filter, Record, Scope};
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
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            dim: None,
            metric: None,
            read_only: false,
            sync: true,
            checkpoint_bytes: 64 << 20,
        }
    }
}

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

/// Restrictions applied inside a search.
#[derive(Debug, Clone, Default)]
pub struct SearchOptions {
    pub filter: Option<Filter>,
    pub scope: Scope,
    pub include_archived: bool,
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
}

impl State<'_> {
    fn apply(&mut self, op: WalOp) {
        match op {
            WalOp::Put { records, vectors } => {
                let ids: Vec<u64> = records.iter().map(|r| r.id).collect();
                self.vectors.upsert(&ids, &vectors);
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
        let mut state = State {
            records: &mut self.records,
            vectors: &mut self.vectors,
        };
        for op in ops {
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
        self.writer()?;
        let n = items.len();
        let prepared = self.prepare(vectors, n)?;
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
        Ok(ids)
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
        let needs_pred = opts.filter.is_some() || !opts.scope.is_empty() || !opts.include_archived;
        let any_archived = !opts.include_archived && self.records.values().any(|r| r.archived);
        if !needs_pred || (opts.filter.is_none() && opts.scope.is_empty() && !any_archived) {
            return Ok(self.vectors.search(&q, k, None));
        }
        let pred = |id: u64| {
            let Some(r) = self.records.get(&id) else {
                return false;
            };
            (opts.include_archived || !r.archived)
                && r.scope.visible_to(&opts.scope)
                && opts
                    .filter
                    .as_ref()
                    .is_none_or(|f| f.matches(r.metadata.as_ref()))
        };
        Ok(self.vectors.search(&q, k, Some(&pred)))
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
        let gen = self.manifest.generation + 1;
        let seg = seg_name(gen);
        let recs: Vec<&Record> = self
            .vectors
            .ids()
            .iter()
            .map(|id| &self.records[id])
            .collect();
        let seg_bytes = segment::write(
            &self.dir.join(&seg),
            gen,
            self.dim,
            self.metric,
            &recs,
            self.vectors.data(),
        )?;
        let new_wal = WalWriter::create(&self.dir.join(wal_name(gen)), gen, self.opts.sync)?;
        let manifest = Manifest {
            generation: gen,
            segment: Some(seg),
            wal: wal_name(gen),
            next_id: self.next_id,
            writer: format!("engramdb {}", env!("CARGO_PKG_VERSION")),
            ..self.manifest.clone()
        };
        manifest::write_atomic(&self.dir, &manifest)?;
        self.manifest = manifest;
        self.wal = Some(new_wal);
        self.wal_frames = 0;
        self.torn_bytes = 0;
        self.segment_bytes = seg_bytes;
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
    })
}

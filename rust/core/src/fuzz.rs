//! Fuzz harnesses for every decoder of bytes read from disk, shared by the
//! bounded-time replay in `rust/core/tests/fuzz_decoders.rs` (run by `cargo
//! test`, so by CI) and the coverage-guided AFL++ binaries in `rust/fuzz/`.
//!
//! Each target takes one input, `[mode byte] ++ file bytes`, and must return
//! without panicking, hanging or allocating more than a small multiple of the
//! input: damaged bytes end in [`Error::Corruption`] (or another typed
//! error), never anything else. Bit 0 of the mode byte asks the harness to
//! recompute every checksum of the file before decoding it, so mutations get
//! past the CRCs into the structural decoders behind them (bytes that pass a
//! CRC by chance, or were written by a buggy writer, must still be safe).
//!
//! | target | input after the mode byte | decoders reached |
//! |---|---|---|
//! | `wal` | a write-ahead log | [`wal::replay_bytes`], [`wal::WalOp`] and record decoding; re-encoding is checked to be stable |
//! | `segment` | a segment file | [`segment::decode`] |
//! | `manifest` | a manifest file | [`manifest::decode`] |
//! | `posting` | byte 0 `dim`, bytes 1..5 head id, then posting pages numbered from 1 | [`posting::unpaginate`], [`PostingData::decode`] (also on the raw stream); re-encoding is checked |
//! | `store` | one file of a small store (mode bits 1-2 pick manifest, segment or log), the others intact | [`Store::open`], `get`/`search` of every record, [`store::verify`], a write and a checkpoint |
//! | `spann` | one file of a small saved SPANN index (mode bits 1-2 pick meta, postings, vectors or update log; bit 3 memory mode) | [`SpannIndex::open`] (update-log replay included), `verify`, `search`, an add, a flush and a reopen |
//!
//! Also here: the mutation engine the replay test uses. It is **not**
//! coverage-guided (stable Rust has no libFuzzer); it mutates the committed
//! corpus with bit flips, byte sets, interesting integers written over
//! length fields, truncations, extensions, chunk deletes, duplications and
//! splices between corpus entries. Coverage guidance comes from the AFL++
//! runs of the same targets (`rust/fuzz/README.md`).

use crate::distance::Metric;
use crate::error::{Error, Result};
use crate::index::spann::{Mode, SearchParams, SpannIndex, SpannParams};
use crate::memory::{Record, Scope};
use crate::storage::codec::{Dec, Enc};
use crate::storage::format::HEADER_LEN;
use crate::storage::posting::{self, PostingData, PAGE, PAGE_PAYLOAD};
use crate::storage::wal::{self, WalOp};
use crate::storage::{manifest, segment};
use crate::store::{self, Insert, SearchOptions, Store, StoreOptions, WriteMode};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The fuzz targets, by name.
pub const TARGETS: &[&str] = &["wal", "segment", "manifest", "posting", "store", "spann"];

/// Dimension of the store and index the `store` and `spann` targets build.
pub const BASE_DIM: usize = 4;
const WAL_DIM: usize = 2;

/// Run target `name` on `data`. Panics only on a bug (that is what the
/// fuzzers look for); every damaged input returns normally.
pub fn run(name: &str, data: &[u8]) {
    let Some((&mode, file)) = data.split_first() else {
        return;
    };
    let fix = mode & 1 == 1;
    match name {
        "wal" => wal_target(file, fix),
        "segment" => {
            let b = fixed(file, fix, fix_segment);
            if let Ok(s) = segment::decode(&b, Path::new("seg")) {
                assert_eq!(s.vectors.len(), s.records.len() * s.dim);
            }
        }
        "manifest" => {
            let _ = manifest::decode(&fixed(file, fix, fix_manifest), Path::new("MANIFEST"));
        }
        "posting" => posting_target(file, fix),
        "store" => store_target(file, mode),
        "spann" => spann_target(file, mode),
        _ => panic!("unknown fuzz target {name}"),
    }
}

fn fixed(file: &[u8], fix: bool, f: fn(&mut [u8])) -> Vec<u8> {
    let mut b = file.to_vec();
    if fix {
        f(&mut b);
    }
    b
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// Recompute the header's CRC.
pub fn fix_header(b: &mut [u8]) {
    if b.len() >= HEADER_LEN {
        let c = crc32fast::hash(&b[..28]);
        put_u32(b, 28, c);
    }
}

/// Recompute the CRC of every whole frame of a log (and of its header).
pub fn fix_wal(b: &mut [u8]) {
    fix_header(b);
    let mut pos = HEADER_LEN;
    while pos + 8 <= b.len() {
        let n = get_u32(b, pos) as usize;
        if n == 0 || pos + 8 + n > b.len() {
            break;
        }
        let c = crc32fast::hash(&b[pos + 8..pos + 8 + n]);
        put_u32(b, pos + 4, c);
        pos += 8 + n;
    }
}

/// Make a segment's trailer agree with its body.
pub fn fix_segment(b: &mut [u8]) {
    fix_header(b);
    if b.len() >= HEADER_LEN + 16 {
        let end = b.len() - 16;
        let body_len = (end - HEADER_LEN) as u64;
        let c = crc32fast::hash(&b[HEADER_LEN..end]);
        b[end..end + 8].copy_from_slice(&body_len.to_le_bytes());
        put_u32(b, end + 8, c);
        b[end + 12..].copy_from_slice(b"SEGE");
    }
}

/// Make a manifest's length and CRC agree with its JSON.
pub fn fix_manifest(b: &mut [u8]) {
    fix_header(b);
    if b.len() >= HEADER_LEN + 8 {
        let n = b.len() - HEADER_LEN - 8;
        put_u32(b, HEADER_LEN, n as u32);
        let c = crc32fast::hash(&b[HEADER_LEN + 4..HEADER_LEN + 4 + n]);
        let at = b.len() - 4;
        put_u32(b, at, c);
    }
}

/// Make a SPANN meta file's length and CRC agree with its body.
pub fn fix_spann_meta(b: &mut [u8]) {
    fix_header(b);
    if b.len() >= HEADER_LEN + 12 {
        let n = b.len() - HEADER_LEN - 12;
        b[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&(n as u64).to_le_bytes());
        let c = crc32fast::hash(&b[HEADER_LEN + 8..HEADER_LEN + 8 + n]);
        let at = b.len() - 4;
        put_u32(b, at, c);
    }
}

/// Recompute the CRC of every whole page, numbering them from `first`.
pub fn fix_pages(b: &mut [u8], first: u64) {
    for (i, page) in b.chunks_exact_mut(PAGE).enumerate() {
        let mut h = crc32fast::Hasher::new();
        h.update(&page[..PAGE_PAYLOAD]);
        h.update(&(first + i as u64).to_le_bytes());
        let c = h.finalize();
        put_u32(page, PAGE_PAYLOAD, c);
    }
}

/// Recompute the CRC of every whole row record of a SPANN vector file.
pub fn fix_vector_file(b: &mut [u8], dim: usize) {
    fix_header(b);
    let rl = dim * 4 + 4;
    if b.len() <= PAGE {
        return;
    }
    for (row, rec) in b[PAGE..].chunks_exact_mut(rl).enumerate() {
        let mut h = crc32fast::Hasher::new();
        h.update(&rec[..dim * 4]);
        h.update(&(row as u64).to_le_bytes());
        let c = h.finalize();
        put_u32(rec, dim * 4, c);
    }
}

fn wal_target(file: &[u8], fix: bool) {
    let b = fixed(file, fix, fix_wal);
    let Ok(r) = wal::replay_bytes(&b, Path::new("wal"), WAL_DIM) else {
        return;
    };
    assert!(r.valid_len + r.torn_bytes == b.len() as u64);
    for op in &r.ops {
        // what decodes must re-encode to bytes that decode to the same bytes
        let mut e = Enc::default();
        op.encode(&mut e);
        let once = e.into_inner();
        let again = WalOp::decode(&mut Dec::new(&once), WAL_DIM).expect("re-encoded op decodes");
        let mut e2 = Enc::default();
        again.encode(&mut e2);
        assert_eq!(once, e2.into_inner(), "WAL op encoding is not stable");
        if let WalOp::Put { records, vectors } = op {
            assert_eq!(vectors.len(), records.len() * WAL_DIM);
        }
    }
}

fn posting_target(file: &[u8], fix: bool) {
    if file.len() < 5 {
        return;
    }
    let dim = (file[0] as usize % 64) + 1;
    let head = get_u32(file, 1);
    let mut pages = file[5..].to_vec();
    if fix {
        fix_pages(&mut pages, 1);
    }
    let p = Path::new("postings");
    // the raw stream decoder, with no page checksums in front of it
    // streams with and without the 1-bit filter columns (posting files of
    // minor version 1 and 0)
    for filter in [true, false] {
        check_posting(
            PostingData::decode(&pages, dim, head, p, filter),
            dim,
            head,
            filter,
        );
        if let Ok(payload) = posting::unpaginate(&pages, 1, p) {
            assert_eq!(payload.len(), pages.len() / PAGE * PAGE_PAYLOAD);
            check_posting(
                PostingData::decode(&payload, dim, head, p, filter),
                dim,
                head,
                filter,
            );
        }
    }
}

fn check_posting(r: Result<PostingData>, dim: usize, head: u32, filter: bool) {
    let Ok(pd) = r else { return };
    let n = pd.len();
    assert!(pd.versions.len() == n && pd.aux.len() == n && pd.codes.len() == n * dim);
    assert_eq!(pd.has_filter(dim), filter || n == 0);
    let enc = pd.encode(head, dim, filter);
    assert_eq!(enc.len(), pd.encoded_len(dim, filter));
    let back =
        PostingData::decode(&enc, dim, head, Path::new("x"), filter).expect("re-encoded decodes");
    assert_eq!(
        back.encode(head, dim, filter),
        enc,
        "posting encoding is not stable"
    );
}

/// A scratch directory per thread, reused across executions.
fn scratch(tag: &str) -> PathBuf {
    thread_local! {
        static N: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    let n = N.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    let root = std::env::var_os("ENGRAMDB_FUZZ_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            if Path::new("/dev/shm").is_dir() {
                PathBuf::from("/dev/shm")
            } else {
                std::env::temp_dir()
            }
        });
    let tid = format!("{:?}", std::thread::current().id())
        .chars()
        .filter(char::is_ascii_digit)
        .collect::<String>();
    let d = root.join(format!(
        "engramdb-fuzz-{tag}-{}-{tid}-{}",
        std::process::id(),
        n % 2
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// The files of a small store: `(name, bytes)` for the manifest, the
/// segment and the log (which holds puts, a patch, a delete and a touch
/// after the checkpoint).
pub fn base_store() -> &'static [(String, Vec<u8>)] {
    static BASE: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = scratch("base-store");
        let opts = StoreOptions {
            dim: Some(BASE_DIM),
            metric: Some(Metric::Cosine),
            sync: false,
            ..Default::default()
        };
        let mut s = Store::open(&dir, opts).expect("create base store");
        let item = |i: u64| Insert {
            id: Some(i),
            text: Some(format!("memory {i}")),
            metadata: Some(serde_json::json!({"topic": i % 3, "tags": ["a", "b"]})),
            scope: Scope {
                user_id: Some(format!("u{}", i % 2)),
                ..Default::default()
            },
            importance: Some(0.5),
            created_at: Some(100.0 + i as f64),
        };
        let vec_of = |i: u64| -> Vec<f32> {
            (0..BASE_DIM)
                .map(|j| ((i as usize * 7 + j * 3) % 11) as f32 - 5.0)
                .collect()
        };
        let v: Vec<f32> = (0..6).flat_map(vec_of).collect();
        s.add(&v, (0..6).map(item).collect(), WriteMode::Add, 200.0)
            .unwrap();
        s.link(0, 1, "similar", 0.9).unwrap();
        s.checkpoint().unwrap();
        let v: Vec<f32> = (6..9).flat_map(vec_of).collect();
        s.add(&v, (6..9).map(item).collect(), WriteMode::Add, 300.0)
            .unwrap();
        s.add(&vec_of(2), vec![item(2)], WriteMode::Upsert, 301.0)
            .unwrap();
        s.delete(&[4]).unwrap();
        s.reinforce(&[1, 7], 400.0).unwrap();
        s.link(6, 7, "similar", 0.5).unwrap();
        let m = manifest::read(&dir).unwrap();
        drop(s);
        let files = vec![
            (
                manifest::FILE.to_string(),
                std::fs::read(dir.join(manifest::FILE)).unwrap(),
            ),
            (
                m.segment.clone().unwrap(),
                std::fs::read(dir.join(m.segment.unwrap())).unwrap(),
            ),
            (m.wal.clone(), std::fs::read(dir.join(&m.wal)).unwrap()),
        ];
        let _ = std::fs::remove_dir_all(&dir);
        files
    })
}

fn store_target(file: &[u8], mode: u8) {
    let base = base_store();
    let which = ((mode >> 1) & 3) as usize % 3;
    let mut b = file.to_vec();
    if mode & 1 == 1 {
        [fix_manifest, fix_segment, fix_wal][which](&mut b);
    }
    let dir = scratch("store");
    for (i, (name, bytes)) in base.iter().enumerate() {
        let data = if i == which { &b } else { bytes };
        std::fs::write(dir.join(name), data).unwrap();
    }
    exercise_store(&dir);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Open the store in `dir` and use it: every call must return a value or a
/// typed error. Public so tests can run it on hand-damaged stores.
pub fn exercise_store(dir: &Path) {
    let ro = StoreOptions {
        read_only: true,
        ..Default::default()
    };
    let verified = store::verify(dir);
    let Ok(s) = Store::open(dir, ro.clone()) else {
        assert!(verified.is_err(), "verify passed a store that cannot open");
        return;
    };
    let dim = s.dim();
    let ids = s.ids();
    assert_eq!(ids.len(), s.len());
    for &id in &ids {
        let (_, v) = s.get(id).expect("every listed id has a record and vector");
        assert_eq!(v.len(), dim);
    }
    if dim <= 4096 && !ids.is_empty() {
        let q: Vec<f32> = (0..dim).map(|j| (j % 5) as f32 - 2.0).collect();
        let k = ids.len().min(8);
        if let Ok(hits) = s.search(&q, 1, k, &SearchOptions::default()) {
            for h in &hits[0] {
                assert!(s.contains(h.id), "search returned an unknown id {}", h.id);
            }
        }
        let scoped = SearchOptions {
            scope: Scope {
                user_id: Some("u1".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        if let Ok(hits) = s.search(&q, 1, k, &scoped) {
            for h in &hits[0] {
                let r = s.record(h.id).expect("hit has a record");
                assert_eq!(r.scope.user_id.as_deref(), Some("u1"), "scope leak");
            }
        }
    }
    drop(s);
    // a writer: cuts any torn tail, appends, checkpoints, and reopens
    let Ok(mut w) = Store::open(dir, StoreOptions::default()) else {
        return;
    };
    if dim <= 4096 {
        let v = vec![0.5f32; dim];
        let added = w.add(&v, vec![Insert::default()], WriteMode::Add, 500.0);
        let before = w.len();
        if w.flush().is_ok() {
            drop(w);
            let again = Store::open(dir, ro).expect("a store reopens after its own checkpoint");
            assert_eq!(again.len(), before);
            if let Ok(ids) = added {
                assert!(again.contains(ids[0]));
            }
        }
    }
}

/// The files of a small saved SPANN index (meta, postings, vectors).
pub fn base_spann() -> &'static [(String, Vec<u8>)] {
    static BASE: OnceLock<Vec<(String, Vec<u8>)>> = OnceLock::new();
    BASE.get_or_init(|| {
        let n = 120;
        let v = crate::testdata::uniform(n, BASE_DIM, 12345);
        let params = SpannParams {
            head_ratio: 0.1,
            ..Default::default()
        };
        let mut idx =
            SpannIndex::build(&v, BASE_DIM, None, Metric::L2, params, None).expect("build");
        let dir = scratch("base-spann");
        idx.save(&dir).expect("save");
        drop(idx);
        // a few updates after the save, so the update log has frames to mutate
        let mut idx = SpannIndex::open(&dir, Mode::Disk).expect("reopen");
        idx.add(&[1000, 1001], &v[..2 * BASE_DIM]).expect("add");
        idx.upsert(&[5], &v[8 * BASE_DIM..9 * BASE_DIM])
            .expect("upsert");
        idx.delete(&[7, 1000]).expect("delete");
        drop(idx);
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        // meta, postings, vectors, update log (the ones the target mutates),
        // then the rest as saved (the lock file)
        let rank = |n: &str| {
            if n == "spann.meta" {
                0
            } else if n.starts_with("postings") {
                1
            } else if n.starts_with("vectors") {
                2
            } else if n.starts_with("wal-") {
                3
            } else {
                4
            }
        };
        files.sort_by_key(|(n, _)| rank(n));
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert!(
            names.len() >= 4 && (0..4).all(|i| rank(names[i]) == i),
            "a saved index has meta, postings, vectors and log files: {names:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
        files
    })
}

fn spann_target(file: &[u8], mode: u8) {
    let base = base_spann();
    let which = ((mode >> 1) & 3) as usize;
    let mut b = file.to_vec();
    if mode & 1 == 1 {
        match which {
            0 => fix_spann_meta(&mut b),
            1 => {
                fix_header(&mut b);
                if b.len() > PAGE {
                    fix_pages(&mut b[PAGE..], 1);
                }
            }
            2 => fix_vector_file(&mut b, BASE_DIM),
            _ => fix_wal(&mut b),
        }
    }
    let dir = scratch("spann");
    for (i, (name, bytes)) in base.iter().enumerate() {
        let data = if i == which { &b } else { bytes };
        std::fs::write(dir.join(name), data).unwrap();
    }
    let m = if mode & 8 != 0 {
        Mode::Memory
    } else {
        Mode::Disk
    };
    exercise_spann(&dir, m);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Open the index in `dir` and use it; public for tests.
pub fn exercise_spann(dir: &Path, mode: Mode) {
    let Ok(idx) = SpannIndex::open(dir, mode) else {
        return;
    };
    let _ = idx.verify();
    let _ = idx.stats();
    let dim = idx.dim();
    if dim == 0 || dim > 4096 {
        return;
    }
    let q: Vec<f32> = (0..2 * dim).map(|j| (j % 5) as f32 * 0.1 - 0.2).collect();
    let sp = SearchParams {
        nprobe: 8,
        ..idx.search_defaults()
    };
    for k in [1, 10] {
        if let Ok(hits) = idx.search(&q, k, &sp, None) {
            assert_eq!(hits.len(), 2);
            for h in hits.iter().flatten() {
                assert!(idx.contains(h.id), "search returned unknown id {}", h.id);
            }
        }
    }
    let _ = idx.search(&q, 3, &idx.search_defaults(), None);
    // a write, a checkpoint and a reopen: what a flush commits must reopen
    let mut idx = idx;
    if idx.add(&[1 << 40], &q[..dim]).is_ok() && idx.flush().is_ok() {
        let n = idx.len();
        drop(idx);
        let again = SpannIndex::open(dir, mode).expect("an index reopens after its own flush");
        assert_eq!(again.len(), n);
        assert!(again.contains(1 << 40));
    }
}

/// The seed inputs of a target: valid files of every kind it reads, each
/// with mode 0 (checksums as written) and mode 1 (checksums recomputed).
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    let with_modes = |file: &[u8], modes: &[u8]| -> Vec<Vec<u8>> {
        modes
            .iter()
            .map(|&m| {
                let mut v = vec![m];
                v.extend_from_slice(file);
                v
            })
            .collect()
    };
    match name {
        "wal" => {
            // a log of dimension WAL_DIM with every operation kind
            let dir = scratch("seed-wal");
            let p = dir.join("wal");
            let mut w = wal::WalWriter::create(&p, 1, false).unwrap();
            let mut r = Record::new(1, 10.0);
            r.text = Some("héllo".into());
            r.metadata = Some(serde_json::json!({"a": [1, 2, {"b": null}]}));
            r.scope.user_id = Some("u".into());
            r.links.push(crate::memory::Link {
                target: 2,
                kind: "similar".into(),
                weight: 0.5,
            });
            w.append(&[
                WalOp::Put {
                    records: vec![r.clone(), Record::new(2, 11.0)],
                    vectors: vec![1.0, 2.0, 3.0, 4.0],
                },
                WalOp::Patch { records: vec![r] },
                WalOp::Touch {
                    touches: vec![wal::Touch {
                        id: 1,
                        last_access: 12.0,
                        strength: 2.0,
                        access_count: 3,
                    }],
                },
                WalOp::Delete { ids: vec![2, 1] },
            ])
            .unwrap();
            let b = std::fs::read(&p).unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            with_modes(&b, &[0, 1])
        }
        "segment" => with_modes(&base_store()[1].1, &[0, 1]),
        "manifest" => with_modes(&base_store()[0].1, &[0, 1]),
        "posting" => {
            let dim = 7;
            let mut out = Vec::new();
            for n in [0usize, 1, 5, 9, 450] {
                let mut pd = PostingData::default();
                for i in 0..n {
                    let code: Vec<i8> = (0..dim).map(|j| (i * 3 + j) as i8).collect();
                    let f = [i as f32, 0.5, 0.125];
                    pd.push(
                        i as u32 * 2,
                        (i % 3) as u8,
                        i as f32 * 0.25,
                        &code,
                        &[i as u8],
                        f,
                    );
                }
                let mut file = vec![(dim - 1) as u8];
                file.extend_from_slice(&42u32.to_le_bytes());
                file.extend_from_slice(&posting::paginate(&pd.encode(42, dim, true), 1));
                out.extend(with_modes(&file, &[0, 1]));
            }
            out
        }
        "store" => base_store()
            .iter()
            .enumerate()
            .flat_map(|(i, (_, b))| with_modes(b, &[(i as u8) << 1, ((i as u8) << 1) | 1]))
            .collect(),
        "spann" => base_spann()
            .iter()
            .take(4)
            .enumerate()
            .flat_map(|(i, (_, b))| {
                let m = (i as u8) << 1;
                with_modes(b, &[m, m | 1, m | 8 | 1])
            })
            .collect(),
        _ => panic!("unknown fuzz target {name}"),
    }
}

/// A small deterministic PRNG (xorshift64*), so a failing run replays from
/// its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    0x10,
    0x7f,
    0x80,
    0xff,
    0x100,
    0xfff,
    0x1000,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 62,
    u64::MAX,
];

/// One structured mutation of `input` (its first byte, the mode, is kept
/// unless a mutation picks it on purpose). `other` is another corpus entry
/// to splice from.
pub fn mutate(input: &[u8], other: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = input.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        let len = b.len();
        let body = 1.min(len); // do not touch the mode byte by default
        let pos = body + rng.below(len.saturating_sub(body).max(1));
        match rng.below(13) {
            0 | 1 if len > body => b[pos.min(len - 1)] ^= 1 << rng.below(8),
            2 if len > body => b[pos.min(len - 1)] = rng.next_u64() as u8,
            3 | 4 => {
                // an interesting integer, often over what looks like a length field
                let w = [1usize, 2, 4, 8][rng.below(4)];
                let mut v = INTERESTING[rng.below(INTERESTING.len())];
                if rng.below(3) == 0 {
                    v = (len as u64)
                        .wrapping_add(rng.below(9) as u64)
                        .wrapping_sub(4);
                }
                let at = if rng.below(2) == 0 {
                    // align to the field grid of the formats
                    pos / 4 * 4
                } else {
                    pos
                };
                if at >= body && at + w <= len {
                    b[at..at + w].copy_from_slice(&v.to_le_bytes()[..w]);
                }
            }
            5 if pos + 4 <= len => {
                // nudge a u32 (off-by-one lengths and counts)
                let v = get_u32(&b, pos);
                let d = rng.below(9) as u32;
                let nv = if rng.below(2) == 0 {
                    v.wrapping_add(d)
                } else {
                    v.wrapping_sub(d)
                };
                put_u32(&mut b, pos, nv);
            }
            6 => b.truncate(pos.max(body)),
            7 => {
                let n = 1 + rng.below(64);
                let fill = rng.below(3);
                for _ in 0..n {
                    b.push(match fill {
                        0 => 0,
                        1 => 0xff,
                        _ => rng.next_u64() as u8,
                    });
                }
            }
            8 if len > pos => {
                let n = 1 + rng.below((len - pos).min(256));
                b.drain(pos..pos + n);
            }
            9 if len > pos => {
                let n = 1 + rng.below((len - pos).min(256));
                let chunk = b[pos..pos + n].to_vec();
                let at = body + rng.below(len - body + 1);
                b.splice(at..at, chunk);
            }
            10 if other.len() > 1 => {
                // splice: our prefix, their suffix
                let cut = 1 + rng.below(other.len() - 1);
                b.truncate(pos.max(body));
                b.extend_from_slice(&other[cut..]);
            }
            11 if other.len() > 1 && len > pos => {
                let from = 1 + rng.below(other.len() - 1);
                let n = (1 + rng.below(64)).min(other.len() - from).min(len - pos);
                b[pos..pos + n].copy_from_slice(&other[from..from + n]);
            }
            12 if len > 0 => b[0] = rng.next_u64() as u8,
            _ => {}
        }
    }
    b
}

/// Whether an error is one a damaged file may produce.
pub fn is_typed_damage(e: &Error) -> bool {
    matches!(
        e,
        Error::Corruption { .. } | Error::FormatVersion { .. } | Error::Io { .. }
    )
}

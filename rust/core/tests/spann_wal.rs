//! The SPANN update log: every acknowledged add/delete survives a crash
//! (a handle dropped without flush), torn tails are cut and never misread,
//! damage in the middle is corruption, and one writer at a time.

use engramdb_core::index::spann::{Mode, OpenOptions, SearchParams, SpannIndex, SpannParams};
use engramdb_core::topk::Hit;
use engramdb_core::{Error, Metric};
use std::path::{Path, PathBuf};
use std::time::Instant;

const DIM: usize = 16;

/// 25 clusters (noise a quarter of the centres' spread); the centres depend on the seed.
fn data(n: usize, seed: u64) -> Vec<f32> {
    engramdb_core::testdata::clustered(n, DIM, 25, 0.25, seed)
}

fn params() -> SpannParams {
    SpannParams {
        posting_cap: 48,
        ..SpannParams::default()
    }
}

fn built(dir: &Path, n: usize) -> SpannIndex {
    built_with(dir, n, params())
}

fn built_with(dir: &Path, n: usize, p: SpannParams) -> SpannIndex {
    let mut idx = SpannIndex::build(&data(n, 1), DIM, None, Metric::L2, p, None).unwrap();
    idx.save(dir).unwrap();
    idx
}

fn live(idx: &SpannIndex) -> Vec<u64> {
    let mut v = idx.ids();
    v.sort();
    v
}

fn search(idx: &SpannIndex, q: &[f32]) -> Vec<Vec<Hit>> {
    idx.search(q, 10, &SearchParams::default(), None).unwrap()
}

fn log_path(dir: &Path) -> PathBuf {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("wal-") && n.ends_with(".log")
        })
        .collect();
    assert_eq!(logs.len(), 1, "{logs:?}");
    logs.pop().unwrap()
}

/// One operation of a scripted workload.
enum Op {
    Add(Vec<u64>, Vec<f32>),
    Upsert(Vec<u64>, Vec<f32>),
    Delete(Vec<u64>),
}

fn script() -> Vec<Op> {
    let mut ops = Vec::new();
    let mut next = 100_000u64;
    for b in 0..8u64 {
        let n = 3 + (b as usize * 7) % 20;
        let ids: Vec<u64> = (next..next + n as u64).collect();
        next += n as u64;
        ops.push(Op::Add(ids, data(n, 10 + b)));
        if b % 2 == 1 {
            // some built vectors and one of the batch just added
            let mut d: Vec<u64> = (b * 40..b * 40 + 15).collect();
            d.push(next - 1);
            d.push(9_999_999); // unknown: ignored
            ops.push(Op::Delete(d));
        }
        if b == 4 {
            ops.push(Op::Upsert(vec![next - 2, 5], data(2, 99)));
        }
    }
    ops
}

fn apply(idx: &mut SpannIndex, op: &Op) {
    match op {
        Op::Add(ids, v) => idx.add(ids, v).unwrap(),
        Op::Upsert(ids, v) => idx.upsert(ids, v).unwrap(),
        Op::Delete(ids) => {
            idx.delete(ids).unwrap();
        }
    }
}

#[test]
fn acknowledged_updates_survive_a_drop_without_flush() {
    let q = data(40, 77);
    for mode in [Mode::Memory, Mode::Disk] {
        let dir = tempfile::tempdir().unwrap();
        let mut idx = built(dir.path(), 2000);
        if mode == Mode::Disk {
            drop(idx);
            idx = SpannIndex::open(dir.path(), Mode::Disk).unwrap();
        }
        for op in script() {
            apply(&mut idx, &op);
        }
        let want_ids = live(&idx);
        let want = search(&idx, &q);
        let log_bytes = idx.stats().log_bytes;
        assert!(log_bytes > 32, "updates are in the log");
        drop(idx); // no flush: what a killed process leaves
        for m in [Mode::Memory, Mode::Disk] {
            let o = SpannIndex::open(dir.path(), m).unwrap();
            assert_eq!(live(&o), want_ids, "{mode:?} then {m:?}");
            // replay rebuilds the very same index: identical answers
            assert_eq!(search(&o, &q), want, "{mode:?} then {m:?}");
            assert_eq!(o.stats().log_bytes, log_bytes);
        }
        // flush folds the log into the files; it starts empty again
        let mut o = SpannIndex::open(dir.path(), Mode::Disk).unwrap();
        o.flush().unwrap();
        assert_eq!(o.stats().log_bytes, 32);
        drop(o);
        let o = SpannIndex::open(dir.path(), Mode::Memory).unwrap();
        assert_eq!(live(&o), want_ids);
        assert_eq!(search(&o, &q), want);
    }
}

#[test]
fn updates_after_compaction_and_save_as_are_logged_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut idx = built(dir.path(), 1500);
    let gone: Vec<u64> = (0..1500).step_by(2).collect();
    idx.delete(&gone).unwrap();
    idx.compact().unwrap();
    idx.add(&[1, 7_000_000], &data(2, 5)).unwrap_err(); // 1 is live
    idx.add(&[0, 7_000_000], &data(2, 5)).unwrap();
    // its own directory spelled another way is still its own (no self-lock)
    idx.save(&dir.path().join(".")).unwrap();
    idx.add(&[7_000_001], &data(1, 6)).unwrap();
    let want = live(&idx);
    // save-as moves the handle (and its lock) to another directory
    let other = tempfile::tempdir().unwrap();
    idx.save(other.path()).unwrap();
    idx.delete(&[7_000_000]).unwrap();
    let want_other = live(&idx);
    drop(idx);
    assert_eq!(
        live(&SpannIndex::open(dir.path(), Mode::Disk).unwrap()),
        want
    );
    assert_eq!(
        live(&SpannIndex::open(other.path(), Mode::Disk).unwrap()),
        want_other
    );
}

#[test]
fn a_torn_tail_at_every_byte_is_cut_and_never_misread() {
    let dir = tempfile::tempdir().unwrap();
    // default posting cap: few splits, so that the many replays stay quick
    let mut idx = built_with(dir.path(), 1200, SpannParams::default());
    let q = data(20, 78);
    // expected state after each whole frame
    let mut ends = vec![idx.stats().log_bytes];
    let mut states = vec![(live(&idx), search(&idx, &q))];
    let mut ops = script();
    // small last frames, so that every byte of them is tried
    ops.push(Op::Add(vec![200_000, 200_001], data(2, 50)));
    ops.push(Op::Delete(vec![200_000, 7, 8]));
    ops.push(Op::Add(vec![200_002], data(1, 51)));
    for op in &ops {
        apply(&mut idx, op);
        ends.push(idx.stats().log_bytes);
        states.push((live(&idx), search(&idx, &q)));
    }
    drop(idx);
    let lp = log_path(dir.path());
    let full = std::fs::read(&lp).unwrap();
    assert_eq!(full.len() as u64, *ends.last().unwrap());
    // every offset of the last four frames, and a sample before them
    let tail_from = ends[ends.len() - 5] as usize;
    let cuts: Vec<usize> = (32..tail_from)
        .step_by(61)
        .chain(tail_from..=full.len())
        .collect();
    for (i, &cut) in cuts.iter().enumerate() {
        std::fs::write(&lp, &full[..cut]).unwrap();
        let whole = ends.iter().filter(|&&e| e as usize <= cut).count() - 1;
        // a reader sees the whole frames and leaves the file alone
        let r = SpannIndex::open_read_only(dir.path(), Mode::Disk).unwrap();
        assert_eq!(live(&r), states[whole].0, "cut at {cut}");
        assert_eq!(search(&r, &q), states[whole].1, "cut at {cut}");
        drop(r);
        assert_eq!(std::fs::metadata(&lp).unwrap().len() as usize, cut);
        let boundary = ends.iter().any(|&e| (e as usize).abs_diff(cut) <= 1);
        if !(boundary || i % 5 == 0) {
            continue;
        }
        // a writer cuts the torn tail and appends after it
        let mut w = SpannIndex::open(dir.path(), Mode::Disk).unwrap();
        assert_eq!(live(&w), states[whole].0, "cut at {cut}");
        assert_eq!(w.stats().log_bytes, ends[whole]);
        w.add(&[55_555_555], &data(1, 3)).unwrap();
        drop(w);
        let o = SpannIndex::open_read_only(dir.path(), Mode::Disk).unwrap();
        assert_eq!(o.len(), states[whole].0.len() + 1, "cut at {cut}");
        assert!(o.contains(55_555_555));
    }
}

#[test]
fn damage_inside_the_log_is_corruption_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut idx = built(dir.path(), 800);
    let mut ends = vec![];
    for op in script() {
        apply(&mut idx, &op);
        ends.push(idx.stats().log_bytes as usize);
    }
    drop(idx);
    let lp = log_path(dir.path());
    let good = std::fs::read(&lp).unwrap();
    let mid = ends[ends.len() / 2];
    // a length that cannot be, a payload byte of the first frame and of
    // one in the middle (each followed by more frames)
    for off in [32 + 3, 32 + 8 + 40, mid + 8 + 20] {
        let mut b = good.clone();
        b[off] ^= 0x5a;
        std::fs::write(&lp, &b).unwrap();
        for ro in [false, true] {
            let opts = OpenOptions::new(Mode::Disk).read_only(ro);
            match SpannIndex::open_with(dir.path(), opts) {
                Err(Error::Corruption { file, .. }) => assert_eq!(file, lp, "offset {off}"),
                Err(e) => panic!("offset {off}: {e}"),
                Ok(_) => panic!("offset {off}: damaged log accepted"),
            }
        }
        // the damaged log is left as it was for inspection
        assert_eq!(std::fs::read(&lp).unwrap(), b);
    }
    // a log whose header is damaged
    let mut b = good.clone();
    b[5] ^= 1;
    std::fs::write(&lp, &b).unwrap();
    assert!(matches!(
        SpannIndex::open(dir.path(), Mode::Memory),
        Err(Error::Corruption { .. })
    ));
}

#[test]
fn one_writer_at_a_time_and_readers_see_acknowledged_updates() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = built(dir.path(), 600);
    assert!(matches!(
        SpannIndex::open(dir.path(), Mode::Disk),
        Err(Error::Locked(_))
    ));
    let mut other = SpannIndex::build(&data(50, 9), DIM, None, Metric::L2, params(), None).unwrap();
    assert!(matches!(other.save(dir.path()), Err(Error::Locked(_))));
    w.add(&[123_456], &data(1, 4)).unwrap();
    let mut r = SpannIndex::open_read_only(dir.path(), Mode::Disk).unwrap();
    assert!(r.contains(123_456), "a reader replays the log");
    assert!(matches!(
        r.add(&[1_000_000], &data(1, 4)),
        Err(Error::ReadOnly)
    ));
    assert!(matches!(r.delete(&[1]), Err(Error::ReadOnly)));
    assert!(matches!(r.flush(), Err(Error::ReadOnly)));
    assert!(matches!(r.compact(), Err(Error::ReadOnly)));
    drop(w);
    let w2 = SpannIndex::open(dir.path(), Mode::Memory).unwrap();
    assert!(w2.contains(123_456));
}

#[test]
fn without_sync_updates_still_survive_a_process_crash() {
    let dir = tempfile::tempdir().unwrap();
    drop(built(dir.path(), 600));
    let mut w =
        SpannIndex::open_with(dir.path(), OpenOptions::new(Mode::Memory).sync(false)).unwrap();
    w.add(&[42_000], &data(1, 4)).unwrap();
    w.delete(&[3]).unwrap();
    drop(w);
    let o = SpannIndex::open(dir.path(), Mode::Disk).unwrap();
    assert!(o.contains(42_000) && !o.contains(3));
}

/// Add throughput with and without the log, same process, same data:
/// `cargo test --release -p engramdb-core --test spann_wal -- --ignored --nocapture`.
/// `SPANN_ADD_N` (default 20000 base vectors), `SPANN_ADD_DIM` (384),
/// `SPANN_ADD_BATCH` (100 vectors per call), `SPANN_ADD_CALLS` (200),
/// `SPANN_ADD_ROUNDS` (3; the three variants run one after another in each
/// round), `SPANN_ADD_DIR` (where the index directories go).
#[test]
#[ignore]
fn add_throughput_with_and_without_the_log() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (n, dim, batch, calls, rounds) = (
        env("SPANN_ADD_N", 20_000),
        env("SPANN_ADD_DIM", 384),
        env("SPANN_ADD_BATCH", 100),
        env("SPANN_ADD_CALLS", 200),
        env("SPANN_ADD_ROUNDS", 3),
    );
    let gen = |n: usize, seed: u64| engramdb_core::testdata::uniform(n, dim, seed);
    let base = gen(n, 1);
    let extra = gen(batch * calls, 2);
    let dir = std::env::var("SPANN_ADD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let fresh = || {
        SpannIndex::build(
            &base,
            dim,
            None,
            Metric::Cosine,
            SpannParams::default(),
            None,
        )
        .unwrap()
    };
    let run = |idx: &mut SpannIndex| -> f64 {
        let t = Instant::now();
        for c in 0..calls {
            let ids: Vec<u64> = (0..batch).map(|i| (n + c * batch + i) as u64).collect();
            idx.add(&ids, &extra[c * batch * dim..(c + 1) * batch * dim])
                .unwrap();
        }
        (batch * calls) as f64 / t.elapsed().as_secs_f64()
    };
    for round in 0..rounds {
        // no directory: no log
        let mut a = fresh();
        let none = run(&mut a);
        drop(a);
        let mut rates = vec![];
        for sync in [false, true] {
            let d = tempfile::tempdir_in(&dir).unwrap();
            let mut b = fresh();
            b.save(d.path()).unwrap();
            drop(b);
            let mut b =
                SpannIndex::open_with(d.path(), OpenOptions::new(Mode::Memory).sync(sync)).unwrap();
            rates.push(run(&mut b));
        }
        eprintln!(
            "round {round}: n={n} dim={dim} batch={batch} calls={calls}: adds/s no log {none:.0}, log without fsync {:.0}, log with fsync per call {:.0}",
            rates[0], rates[1]
        );
    }
}

#[test]
fn readers_open_consistently_while_a_writer_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = built(dir.path(), 800);
    let path = dir.path().to_path_buf();
    let writer = std::thread::spawn(move || {
        for b in 0..30u64 {
            let ids: Vec<u64> = (1_000_000 + b * 10..1_000_000 + b * 10 + 10).collect();
            w.add(&ids, &data(10, 200 + b)).unwrap();
            if b % 3 == 0 {
                w.flush().unwrap();
            }
            if b == 20 {
                w.compact().unwrap();
            }
        }
        w.len()
    });
    let mut last = 800;
    while !writer.is_finished() {
        let r = SpannIndex::open_read_only(&path, Mode::Disk).unwrap();
        // acknowledged adds only ever accumulate; every prefix is whole batches
        assert!(
            r.len() >= last && (r.len() - 800).is_multiple_of(10),
            "{}",
            r.len()
        );
        last = r.len();
    }
    let n = writer.join().unwrap();
    assert_eq!(
        SpannIndex::open_read_only(&path, Mode::Memory)
            .unwrap()
            .len(),
        n
    );
}

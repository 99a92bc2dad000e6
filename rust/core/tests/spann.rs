//! Integration tests of the SPANN index: recall against brute force, memory
//! and disk modes agreeing, reopening, corruption, updates and compaction.

use engramdb_core::index::spann::{Mode, SearchParams, SpannIndex, SpannParams};
use engramdb_core::index::VectorIndex;
use engramdb_core::{Error, Metric};
use std::time::Instant;

/// Clustered data: `centers` random centres plus noise, like real embeddings.
fn clustered(n: usize, dim: usize, centers: usize, seed: u64) -> Vec<f32> {
    engramdb_core::testdata::clustered(n, dim, centers, 0.35, seed)
}

fn normalized(mut v: Vec<f32>, dim: usize) -> Vec<f32> {
    for r in v.chunks_exact_mut(dim) {
        let n: f32 = r.iter().map(|x| x * x).sum::<f32>().sqrt();
        r.iter_mut().for_each(|x| *x /= n);
    }
    v
}

fn brute(base: &[f32], ids: &[u64], q: &[f32], dim: usize, k: usize) -> Vec<u64> {
    let mut s: Vec<(f32, u64)> = base
        .chunks_exact(dim)
        .zip(ids)
        .map(|(v, &id)| (v.iter().zip(q).map(|(a, b)| a * b).sum::<f32>(), id))
        .collect();
    s.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
    s.iter().take(k).map(|x| x.1).collect()
}

fn recall(got: &[Vec<u64>], want: &[Vec<u64>]) -> f64 {
    let mut hit = 0;
    let mut tot = 0;
    for (g, w) in got.iter().zip(want) {
        hit += g.iter().filter(|x| w.contains(x)).count();
        tot += w.len();
    }
    hit as f64 / tot as f64
}

fn ids_of(hits: &[Vec<engramdb_core::topk::Hit>]) -> Vec<Vec<u64>> {
    hits.iter()
        .map(|h| h.iter().map(|x| x.id).collect())
        .collect()
}

const DIM: usize = 32;

struct Fixture {
    base: Vec<f32>,
    ids: Vec<u64>,
    queries: Vec<f32>,
    truth: Vec<Vec<u64>>,
}

fn fixture(n: usize) -> Fixture {
    let base = normalized(clustered(n, DIM, 200, 11), DIM);
    let queries = normalized(clustered(100, DIM, 200, 99), DIM);
    let ids: Vec<u64> = (0..n as u64).map(|i| i * 7 + 3).collect();
    let truth = queries
        .chunks_exact(DIM)
        .map(|q| brute(&base, &ids, q, DIM, 10))
        .collect();
    Fixture {
        base,
        ids,
        queries,
        truth,
    }
}

#[test]
fn recall_memory_disk_reopen_agree() {
    let f = fixture(20_000);
    let mut idx = SpannIndex::build(
        &f.base,
        DIM,
        Some(&f.ids),
        Metric::Cosine,
        SpannParams::default(),
        None,
    )
    .unwrap();
    let sp = SearchParams::default();
    let mem = idx.search(&f.queries, 10, &sp, None).unwrap();
    let r = recall(&ids_of(&mem), &f.truth);
    assert!(r >= 0.95, "recall {r}");
    let st = idx.stats();
    assert!(st.heads > 600 && st.heads < 1500, "{st:?}");
    assert!(st.replicas >= 1.0 && st.replicas <= 8.0, "{st:?}");

    let dir = tempfile::tempdir().unwrap();
    idx.save(dir.path()).unwrap();
    let after_save = idx.search(&f.queries, 10, &sp, None).unwrap();
    assert_eq!(mem, after_save);
    for mode in [Mode::Disk, Mode::Memory] {
        // `idx` holds the writer lock: a second handle opens read-only
        let o = SpannIndex::open_read_only(dir.path(), mode).unwrap();
        let got = o.search(&f.queries, 10, &sp, None).unwrap();
        assert_eq!(got, mem, "{mode:?} differs from the built index");
        let st = o.stats();
        assert!(st.last_postings_read > 0);
        if mode == Mode::Disk {
            assert!(st.last_bytes_read > 0);
            assert!(st.ram_bytes < idx.stats().ram_bytes / 2, "{st:?}");
        } else {
            assert_eq!(st.last_bytes_read, 0);
        }
    }
    // O_DIRECT reads (issued in parallel) return the same answers
    let mut od = SpannIndex::open_read_only(dir.path(), Mode::Disk).unwrap();
    if od.set_direct_io(true) {
        assert_eq!(od.search(&f.queries, 10, &sp, None).unwrap(), mem);
        assert!(od.stats().last_bytes_read > 0);
    }
    let o = SpannIndex::open_read_only(dir.path(), Mode::Disk).unwrap();
    let rep = o.verify().unwrap();
    assert_eq!(rep.vectors, 20_000);
    // the trait view answers the same as the rich API
    // (the rich API re-normalises, so scores may differ in the last bit)
    let prepared = f.queries.clone();
    let got = ids_of(&VectorIndex::search(&o, &prepared, 10, None));
    let want = ids_of(&mem);
    let same = got.iter().zip(&want).filter(|(a, b)| a == b).count();
    assert!(same >= want.len() - 2, "{same} of {} agree", want.len());
    // filters apply inside the search
    let only = |id: u64| id % 2 == 1;
    let got = o.search(&f.queries, 10, &sp, Some(&only)).unwrap();
    assert!(got.iter().flatten().all(|h| h.id % 2 == 1));
    assert!(got.iter().all(|h| h.len() == 10));
}

#[test]
fn wrong_dimension_fails_before_io_and_flipped_byte_is_corruption() {
    let f = fixture(3000);
    let mut idx =
        SpannIndex::build(&f.base, DIM, None, Metric::L2, SpannParams::default(), None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    idx.save(dir.path()).unwrap();
    let o = SpannIndex::open_read_only(dir.path(), Mode::Disk).unwrap();
    let e = o
        .search(&f.queries[..DIM - 1], 10, &SearchParams::default(), None)
        .unwrap_err();
    assert!(
        matches!(e, Error::DimensionMismatch { expected: DIM, .. }),
        "{e}"
    );
    assert_eq!(o.stats().last_postings_read, 0, "no posting was read");

    // flip one byte inside the first posting page
    let pfile = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("postings-"))
        .unwrap();
    let mut bytes = std::fs::read(&pfile).unwrap();
    let n_pages = bytes.len() / 4096;
    for page in 1..n_pages {
        bytes[page * 4096 + 10] ^= 0x40;
    }
    std::fs::write(&pfile, &bytes).unwrap();
    let o = SpannIndex::open_read_only(dir.path(), Mode::Disk).unwrap();
    let e = o
        .search(&f.queries, 10, &SearchParams::default(), None)
        .unwrap_err();
    assert!(matches!(e, Error::Corruption { .. }), "{e}");
    assert!(matches!(o.verify(), Err(Error::Corruption { .. })));
    assert!(matches!(
        SpannIndex::open_read_only(dir.path(), Mode::Memory),
        Err(Error::Corruption { .. })
    ));
}

#[test]
fn churn_keeps_recall_and_compaction_bounds_disk() {
    let f = fixture(20_000);
    let p = SpannParams::default();
    let dir = tempfile::tempdir().unwrap();
    let mut idx =
        SpannIndex::build(&f.base, DIM, Some(&f.ids), Metric::Cosine, p.clone(), None).unwrap();
    idx.save(dir.path()).unwrap();
    let sp = SearchParams::default();
    let fresh = recall(
        &ids_of(&idx.search(&f.queries, 10, &sp, None).unwrap()),
        &f.truth,
    );
    let fresh_disk = idx.stats().disk_bytes;

    drop(idx); // release the writer lock
    let mut idx = SpannIndex::open(dir.path(), Mode::Disk).unwrap();
    // delete half, in two batches, then re-insert them
    let half: Vec<usize> = (0..f.ids.len()).filter(|i| i % 2 == 0).collect();
    let del: Vec<u64> = half.iter().map(|&i| f.ids[i]).collect();
    assert_eq!(idx.delete(&del).unwrap(), del.len());
    assert_eq!(idx.len(), f.ids.len() - del.len());
    let got = ids_of(&idx.search(&f.queries, 10, &sp, None).unwrap());
    assert!(
        got.iter().flatten().all(|id| !del.contains(id)),
        "deleted ids returned"
    );
    idx.flush().unwrap();
    let vecs: Vec<f32> = half
        .iter()
        .flat_map(|&i| f.base[i * DIM..(i + 1) * DIM].to_vec())
        .collect();
    for (ids, v) in del.chunks(2500).zip(vecs.chunks(2500 * DIM)) {
        idx.add(ids, v).unwrap();
        idx.flush().unwrap();
    }
    assert!(matches!(
        idx.add(&del[..1], &vecs[..DIM]),
        Err(Error::DuplicateId(_))
    ));
    let churned = recall(
        &ids_of(&idx.search(&f.queries, 10, &sp, None).unwrap()),
        &f.truth,
    );
    let before = idx.stats().disk_bytes;
    let rep = idx.compact().unwrap();
    let after = idx.stats();
    let compacted = recall(
        &ids_of(&idx.search(&f.queries, 10, &sp, None).unwrap()),
        &f.truth,
    );
    eprintln!(
        "fresh {fresh:.4} churned {churned:.4} compacted {compacted:.4} disk fresh {fresh_disk} before {before} after {} {rep:?}",
        after.disk_bytes
    );
    assert!(
        churned >= fresh - 0.02,
        "churned {churned} vs fresh {fresh}"
    );
    assert!(
        compacted >= fresh - 0.02,
        "compacted {compacted} vs fresh {fresh}"
    );
    assert!(
        (after.disk_bytes as f64) <= 1.5 * fresh_disk as f64,
        "{} vs {fresh_disk}",
        after.disk_bytes
    );
    assert!(after.disk_bytes < before);
    assert_eq!(after.live, f.ids.len());
    // compaction survives a reopen with the same answers
    let o = SpannIndex::open_read_only(dir.path(), Mode::Memory).unwrap();
    assert_eq!(
        o.search(&f.queries, 10, &sp, None).unwrap(),
        idx.search(&f.queries, 10, &sp, None).unwrap()
    );
}

/// Recall and speed on the shared 200k set, prepared as raw files by
/// `python3 -c "..."` (see benches/ann.py). Run with
/// `cargo test --release --test spann -- --ignored --nocapture`.
/// CPU seconds used by this thread (user + system, from /proc; 0 where
/// unavailable): on a shared machine a steadier measure than wall time.
fn thread_cpu_s() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/thread-self/stat") else {
        return 0.0;
    };
    // fields after the parenthesised command name; utime and stime are 14 and 15
    let rest = s.rsplit_once(')').map_or("", |x| x.1);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

#[test]
#[ignore]
fn shared_data_recall() {
    let dir = std::env::var("SPANN_DATA").unwrap_or("/tmp/spann-data".into());
    let read = |name: &str| std::fs::read(format!("{dir}/{name}")).unwrap();
    let f32s = |b: Vec<u8>| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let dim = 384;
    let base = f32s(read("base.f32"));
    let queries = f32s(read("queries.f32"));
    let gt: Vec<u64> = read("gt10.u32")
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as u64)
        .collect();
    let truth: Vec<Vec<u64>> = gt.chunks(10).map(|c| c.to_vec()).collect();
    let env = |k: &str, d: f32| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let params = SpannParams {
        head_ratio: env("HEAD_RATIO", SpannParams::default().head_ratio),
        rng_factor: env("RNG_FACTOR", SpannParams::default().rng_factor),
        build_coarse_probe: env("BUILD_PROBE", 16.0) as usize,
        kmeans_iters: env("KM_ITERS", 8.0) as usize,
        ..SpannParams::default()
    };
    let t = Instant::now();
    let saved = std::env::var("SPANN_SAVED").ok();
    let mut idx = match &saved {
        Some(p) if std::path::Path::new(p).exists() => {
            SpannIndex::open(std::path::Path::new(p), Mode::Memory).unwrap()
        }
        _ => SpannIndex::build(&base, dim, None, Metric::Cosine, params, None).unwrap(),
    };
    if let Some(p) = &saved {
        if idx.path().is_none() {
            idx.save(std::path::Path::new(p)).unwrap();
        }
    }
    eprintln!("build {:.1}s {:?}", t.elapsed().as_secs_f64(), idx.stats());
    let grid: Vec<(usize, usize, usize, f32, f32)> = std::env::var("GRID")
        .unwrap_or("16,8,32;32,12,48;64,24,64;96,32,100;128,48,128".into())
        .split(';')
        .map(|t| {
            let v: Vec<f32> = t.split(',').map(|x| x.parse().unwrap()).collect();
            let eps = v.get(3).copied().unwrap_or(10.0);
            let filter = v.get(4).copied().unwrap_or(SearchParams::default().filter);
            (v[0] as usize, v[1] as usize, v[2] as usize, eps, filter)
        })
        .collect();
    for (nprobe, coarse, rerank, epsilon, filter) in grid {
        let sp = SearchParams {
            nprobe,
            coarse_probe: coarse,
            rerank,
            epsilon,
            filter,
        };
        let t = Instant::now();
        let cpu0 = thread_cpu_s();
        // REPS: run the queries this many times (the last run's answers
        // give the recall) for steadier timings
        let reps = env("REPS", 1.0).max(1.0) as usize;
        let mut got = Vec::new();
        for _ in 1..reps {
            for q in queries.chunks_exact(dim) {
                idx.search(q, 10, &sp, None).unwrap();
            }
        }
        for q in queries.chunks_exact(dim) {
            got.push(idx.search(q, 10, &sp, None).unwrap().remove(0));
        }
        let dt = t.elapsed().as_secs_f64();
        let cpu = thread_cpu_s() - cpu0;
        eprintln!(
            "nprobe {nprobe} coarse {coarse} rerank {rerank} eps {epsilon} filter {filter}: recall {:.4} qps(1 query/call) {:.0} (per CPU second {:.0})",
            recall(&ids_of(&got), &truth),
            (reps * queries.len() / dim) as f64 / dt,
            (reps * queries.len() / dim) as f64 / cpu
        );
    }
    // a fresh build also saves once (its disk layout in the stats); a run
    // on a saved index measures only the queries
    if saved.is_none() {
        let d = tempfile::tempdir().unwrap();
        idx.save(d.path()).unwrap();
        eprintln!("disk {:?}", idx.stats());
    }
}

/// Ratio pruning keeps only heads within (1 + epsilon) of the nearest one.
/// When the query *is* a head its distance is ~0 and nothing else passes;
/// `epsilon = 0` forces the same cut for every query. The search must then
/// read on (nearest heads first) until it has k hits instead of returning
/// fewer.
#[test]
fn pruning_never_returns_fewer_than_k() {
    let f = fixture(5_000);
    let idx = SpannIndex::build(
        &f.base,
        DIM,
        Some(&f.ids),
        Metric::Cosine,
        SpannParams::default(),
        None,
    )
    .unwrap();
    let k = 300; // more than the nearest posting holds (cap 160)
    let sp = SearchParams {
        epsilon: 0.0,
        ..SearchParams::default()
    };
    let got = idx.search(&f.queries, k, &sp, None).unwrap();
    assert!(got.iter().all(|h| h.len() == k));
    // and itself first when the query is a stored vector
    let got = idx.search(&f.base[..50 * DIM], 2, &sp, None).unwrap();
    for (i, h) in got.iter().enumerate() {
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].id, f.ids[i]);
    }
}

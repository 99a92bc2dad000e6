//! Concurrent searches on one `Store`, driven the way the Python binding
//! drives them: each caller enters a shared rayon pool with `install`.
//!
//! Regression: the first unfiltered searches of a store past
//! `ann_threshold` build the SPANN index on the pool. When the builder held a
//! lock that the other searches blocked on *inside* the pool, a worker
//! blocked on it could be the one the build's sub-tasks needed, and every
//! thread waited forever.

use engramdb_core::store::{Insert, SearchOptions, WriteMode};
use engramdb_core::{Metric, Store, StoreOptions};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

fn data(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    engramdb_core::testdata::uniform(n, dim, seed)
}

#[test]
fn simultaneous_first_ann_searches_finish() {
    let dir = tempfile::tempdir().unwrap();
    let (n, dim) = (4000, 16);
    let opts = StoreOptions {
        dim: Some(dim),
        metric: Some(Metric::Ip),
        sync: false,
        ann_threshold: 1500,
        ..Default::default()
    };
    {
        let mut s = Store::open(dir.path(), opts.clone()).unwrap();
        let items = (0..n).map(|_| Insert::default()).collect();
        s.add(&data(n, dim, 1), items, WriteMode::Add, 0.0).unwrap();
        s.flush().unwrap();
    }
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap(),
    );
    let queries = data(8, dim, 2);
    // under valgrind: ENGRAMDB_TEST_ROUNDS=2 ENGRAMDB_TEST_TIMEOUT_S=3000
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (rounds, limit) = (
        env("ENGRAMDB_TEST_ROUNDS", 12),
        env("ENGRAMDB_TEST_TIMEOUT_S", 60),
    );
    for round in 0..rounds {
        let store = Arc::new(
            Store::open(
                dir.path(),
                StoreOptions {
                    read_only: true,
                    ..opts.clone()
                },
            )
            .unwrap(),
        );
        let (tx, rx) = mpsc::channel();
        for t in 0..8 {
            let (store, pool, tx) = (store.clone(), pool.clone(), tx.clone());
            let q = queries[t * dim..(t + 1) * dim].to_vec();
            std::thread::spawn(move || {
                let hits = pool.install(|| store.search(&q, 1, 5, &SearchOptions::default()));
                tx.send(hits.map(|h| h[0].len())).unwrap();
            });
        }
        drop(tx);
        for _ in 0..8 {
            let got = rx
                .recv_timeout(Duration::from_secs(limit))
                .unwrap_or_else(|_| panic!("round {round}: searches deadlocked"));
            assert_eq!(got.unwrap(), 5);
        }
        assert_eq!(store.index_kind(), "spann");
    }
}

//! engramdb-core: the storage engine and indexes of engramdb, free of Python.
//!
//! A newcomer's map, one module per concept:
//!
//! | module | concept |
//! |---|---|
//! | [`error`] | the one error enum every fallible call returns |
//! | [`fault`] | crash points for fault-injection tests (off unless `ENGRAMDB_CRASH_AT` is set) |
//! | [`distance`] | metrics and SIMD distance kernels (run-time CPU detection) |
//! | [`topk`] | bounded top-k selection shared by every index |
//! | [`index`] | the [`index::VectorIndex`] trait and its implementations (exact [`index::flat`]) |
//! | [`rng`] | the seedable generator (splitmix64) behind k-means seeding, rotations and LSH planes |
//! | [`memory`] | what a record is ([`memory::record`]) and metadata filters ([`memory::filter`]) |
//! | [`storage`] | bytes on disk: file headers, write-ahead log, segments, manifest, lock |
//! | [`store`] | [`store::Store`], the one place that coordinates records, indexes and the log |
//! | `testdata` | deterministic pseudo-random vectors for tests, benches and fuzz seeds |

pub mod distance;
pub mod error;
pub mod fault;
#[doc(hidden)]
pub mod fuzz;
pub mod index;
pub mod memory;
pub mod rng;
pub mod storage;
pub mod store;
#[doc(hidden)]
pub mod testdata;
pub mod topk;

pub use distance::Metric;
pub use error::{Error, Result};
pub use store::{Store, StoreOptions};

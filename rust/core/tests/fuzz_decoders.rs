//! Bounded-time fuzzing of every decoder of bytes from disk (see
//! `engramdb_core::fuzz` for the targets). Each test replays the target's
//! generated seeds and its committed corpus (`rust/fuzz/corpus/<target>/`,
//! seeds plus every regression found so far), then mutates that corpus for
//! `ENGRAMDB_FUZZ_SECS` seconds (default 3; 0 = replay only). The mutations
//! are structured (bit flips, interesting integers over length fields,
//! truncations, splices...) but **not coverage-guided**; the AFL++ runs in
//! `rust/fuzz/` are. A single allocation above 64 MiB aborts the run with
//! the input in hex (a length field trusted too far), an input that takes
//! more than 10 s fails it (30 s: a watchdog saves it and aborts: a hang),
//! and a panic fails it with the input saved under `target/fuzz-failures/`.
//!
//! The mutations follow `ENGRAMDB_FUZZ_SEED` (default: the clock); `make
//! test` fixes it, so CI explores the same sequence every run.
//!
//! `ENGRAMDB_FUZZ_INPUT=target/fuzz-failures/<target>-<hash>` reruns one
//! saved input alone. `ENGRAMDB_FUZZ_WRITE_SEEDS=1` (re)writes the generated seeds into the
//! committed corpus.

use engramdb_core::fuzz::{self, Rng};
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const ALLOC_LIMIT: usize = 64 << 20;

/// The input being run (the decoders may allocate on rayon's threads, so
/// this is global: with tests in parallel it is the latest of any target).
static CURRENT_PTR: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static CURRENT_LEN: AtomicUsize = AtomicUsize::new(0);

fn set_current(input: &[u8]) {
    CURRENT_LEN.store(input.len(), Ordering::SeqCst);
    CURRENT_PTR.store(input.as_ptr() as *mut u8, Ordering::SeqCst);
}

struct Guard;

impl Guard {
    #[cold]
    fn oversize(size: usize) -> ! {
        let mut err = std::io::stderr();
        let _ = writeln!(
            err,
            "\nfuzz: one allocation of {size} bytes (limit {ALLOC_LIMIT}); input (hex):"
        );
        let (p, n) = (
            CURRENT_PTR.load(Ordering::SeqCst),
            CURRENT_LEN.load(Ordering::SeqCst),
        );
        if !p.is_null() {
            // SAFETY: the harness points CURRENT at a live input around each run
            let input = unsafe { std::slice::from_raw_parts(p, n.min(1 << 16)) };
            let mut line = [0u8; 128];
            for chunk in input.chunks(64) {
                for (i, b) in chunk.iter().enumerate() {
                    line[2 * i] = b"0123456789abcdef"[(b >> 4) as usize];
                    line[2 * i + 1] = b"0123456789abcdef"[(b & 15) as usize];
                }
                let _ = err.write_all(&line[..2 * chunk.len()]);
                let _ = err.write_all(b"\n");
            }
        }
        // small allocations are still served, so a backtrace can be taken
        let _ = writeln!(err, "{}", std::backtrace::Backtrace::force_capture());
        std::process::abort()
    }
}

unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > ALLOC_LIMIT {
            Self::oversize(l.size());
        }
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() > ALLOC_LIMIT {
            Self::oversize(l.size());
        }
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > ALLOC_LIMIT {
            Self::oversize(new);
        }
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GUARD: Guard = Guard;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// When the running input started (ms since the epoch; 0: none running).
static EXEC_START: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A hang never returns, so a watchdog saves the input and aborts after 30 s.
fn start_watchdog() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_secs(1));
            let t = EXEC_START.load(Ordering::SeqCst);
            if t != 0 && now_ms().saturating_sub(t) > 30_000 {
                let (p, n) = (
                    CURRENT_PTR.load(Ordering::SeqCst),
                    CURRENT_LEN.load(Ordering::SeqCst),
                );
                let dir =
                    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-failures");
                let _ = std::fs::create_dir_all(&dir);
                if !p.is_null() {
                    // SAFETY: the harness points CURRENT at a live input around each run
                    let input = unsafe { std::slice::from_raw_parts(p, n) };
                    let f = dir.join(format!("hang-{:016x}", fnv(input)));
                    let _ = std::fs::write(&f, input);
                    eprintln!(
                        "\nfuzz: an input ran for 30 s (a hang), saved to {}",
                        f.display()
                    );
                }
                std::process::abort();
            }
        });
    });
}

/// Run one input; a panic or a hang fails the test with the input saved.
fn exec(target: &str, input: &[u8], origin: &str) {
    start_watchdog();
    set_current(input);
    EXEC_START.store(now_ms(), Ordering::SeqCst);
    let t = Instant::now();
    let r = catch_unwind(AssertUnwindSafe(|| fuzz::run(target, input)));
    CURRENT_PTR.store(std::ptr::null_mut(), Ordering::SeqCst);
    EXEC_START.store(0, Ordering::SeqCst);
    let took = t.elapsed();
    let failure = match r {
        Err(e) => Some(format!(
            "panicked: {}",
            e.downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| e.downcast_ref::<&str>().copied())
                .unwrap_or("?")
        )),
        Ok(()) if took > Duration::from_secs(10) => Some(format!("took {took:?}")),
        Ok(()) => None,
    };
    if let Some(why) = failure {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/fuzz-failures");
        let _ = std::fs::create_dir_all(&dir);
        let p = dir.join(format!("{target}-{:016x}", fnv(input)));
        let _ = std::fs::write(&p, input);
        panic!(
            "fuzz target {target} {why} on an input from {origin}, saved to {} \
             (add it to rust/fuzz/corpus/{target}/ once fixed)",
            p.display()
        );
    }
}

fn fuzz_target(target: &str) {
    // ENGRAMDB_FUZZ_INPUT=FILE: run just that input, unguarded, on the
    // target its name starts with or its folder is named after (how a saved
    // failure or a corpus entry is reproduced)
    if let Some(p) = std::env::var_os("ENGRAMDB_FUZZ_INPUT") {
        let p = PathBuf::from(p);
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let parent = p.parent().and_then(|d| d.file_name());
        if name.starts_with(target) || parent.is_some_and(|d| d == target) {
            fuzz::run(target, &std::fs::read(&p).unwrap());
        }
        return;
    }
    let seeds = fuzz::seeds(target);
    let dir = corpus_dir(target);
    if std::env::var_os("ENGRAMDB_FUZZ_WRITE_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), s).unwrap();
        }
    }
    let mut corpus: Vec<(String, Vec<u8>)> = seeds
        .into_iter()
        .enumerate()
        .map(|(i, s)| (format!("generated seed {i}"), s))
        .collect();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    for p in files {
        corpus.push((p.display().to_string(), std::fs::read(&p).unwrap()));
    }
    let t0 = Instant::now();
    for (origin, input) in &corpus {
        exec(target, input, origin);
    }
    let replayed = corpus.len();
    let replay_time = t0.elapsed();

    let secs: f64 = std::env::var("ENGRAMDB_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    // `seed` is what ENGRAMDB_FUZZ_SEED names (and what a failure prints,
    // so setting it reruns the same sequence); each target mixes in its name
    let seed: u64 = std::env::var("ENGRAMDB_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let mut rng = Rng::new(seed ^ fnv(target.as_bytes()));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut execs = 0u64;
    while Instant::now() < deadline {
        let a = rng.below(corpus.len());
        let b = rng.below(corpus.len());
        let m = fuzz::mutate(&corpus[a].1, &corpus[b].1, &mut rng);
        exec(
            target,
            &m,
            &format!("mutating {} (ENGRAMDB_FUZZ_SEED={seed})", corpus[a].0),
        );
        execs += 1;
    }
    eprintln!(
        "fuzz {target}: replayed {replayed} corpus inputs in {replay_time:.2?}, \
         then {execs} mutated inputs in {secs} s (seed {seed}): no panic, hang or oversize allocation"
    );
}

#[test]
fn fuzz_wal() {
    fuzz_target("wal");
}

#[test]
fn fuzz_segment() {
    fuzz_target("segment");
}

#[test]
fn fuzz_manifest() {
    fuzz_target("manifest");
}

#[test]
fn fuzz_posting() {
    fuzz_target("posting");
}

#[test]
fn fuzz_store() {
    fuzz_target("store");
}

#[test]
fn fuzz_spann() {
    fuzz_target("spann");
}

//! One AFL++ binary for every target: `ENGRAMDB_FUZZ_TARGET=wal cargo afl
//! fuzz -i corpus/wal -o out/wal target/debug/fuzz` (see README.md).

fn main() {
    let target = std::env::var("ENGRAMDB_FUZZ_TARGET").unwrap_or_else(|_| {
        eprintln!(
            "set ENGRAMDB_FUZZ_TARGET to one of {:?}",
            engramdb_core::fuzz::TARGETS
        );
        std::process::exit(2)
    });
    assert!(
        engramdb_core::fuzz::TARGETS.contains(&target.as_str()),
        "unknown target {target}"
    );
    afl::fuzz!(|data: &[u8]| {
        engramdb_core::fuzz::run(&target, data);
    });
}

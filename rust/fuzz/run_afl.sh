#!/usr/bin/env bash
# Coverage-guided AFL++ runs of every target, SECS seconds each (default 240),
# one after the other; prints each target's figures from fuzzer_stats.
# Needs `cargo install cargo-afl` (stable Rust is fine). Usage:
#   rust/fuzz/run_afl.sh [SECS] [target...]
# AFL_RESUME=1 continues from the queue of the last run instead of the corpus.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-240}; shift || true
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(wal segment manifest posting store spann)
cargo afl build --release
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
for t in "${targets[@]}"; do
  input="corpus/$t"
  if [ "${AFL_RESUME:-0}" = 1 ] && [ -d "out/$t/default/queue" ]; then
    input=-
  else
    rm -rf "out/$t"
  fi
  mkdir -p out
  # -t: per-input timeout (ms); -m none: the targets bound their own allocations
  ENGRAMDB_FUZZ_TARGET=$t cargo afl fuzz -V "$secs" -t 2000 -m none \
    -i "$input" -o "out/$t" target/release/fuzz >"out/$t.log" 2>&1 || true
  s="out/$t/default/fuzzer_stats"
  if [ -f "$s" ]; then
    awk -v t="$t" -F' *: ' '{v[$1]=$2} END {printf "%-9s run_time=%ss execs=%s execs/s=%s edges=%s corpus=%s crashes=%s hangs=%s\n", t, v["run_time"], v["execs_done"], v["execs_per_sec"], v["edges_found"], v["corpus_count"], v["saved_crashes"], v["saved_hangs"]}' "$s"
  else
    echo "$t: no stats (see out/$t.log)"; tail -5 "out/$t.log"
  fi
done

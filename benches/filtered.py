"""Filtered search at 10%, 1% and 0.1% selectivity on real MiniLM vectors.

Each of the 200k vectors of ../shared/data/mixed-minilm-384 gets a metadata
field ``bucket`` drawn uniformly from 0..999; the filters keep bucket < 100,
< 10 and == 0. Ground truth is numpy brute force over the matching rows.
Reports recall@10 and queries/s (one thread, batches of 1) for engramdb's
filtered search, next to the same search without a filter. The store caches
the rows matching the last filter until the next write, so the first query
after a write pays a scan of every record's metadata: reported separately.

    python benches/filtered.py [--n 200000] [--queries 200] [--out benches/out/filtered.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import engramdb

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mixed-minilm-384"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    base = np.load(DATA / "base.npy")[: args.n].astype(np.float32)
    queries = np.load(DATA / "queries.npy")[: args.queries]
    rng = np.random.default_rng(7)
    bucket = rng.integers(0, 1000, len(base))
    engramdb.set_num_threads(args.threads)
    cases = [
        ("none", None, np.ones(len(base), bool)),
        ("10%", {"bucket": {"lt": 100}}, bucket < 100),
        ("1%", {"bucket": {"lt": 10}}, bucket < 10),
        ("0.1%", {"bucket": 0}, bucket == 0),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with engramdb.Store(Path(tmp) / "s", dim=base.shape[1], metric="ip", sync=False) as s:
            for lo in range(0, len(base), 50_000):
                s.add(base[lo : lo + 50_000], metadata=[{"bucket": int(b)} for b in bucket[lo : lo + 50_000]])
            for name, flt, mask in cases:
                idx = np.flatnonzero(mask)
                sims = queries @ base[idx].T
                gt = idx[np.argsort(-sims, axis=1)[:, : args.k]]
                tmp_id = s.add(base[:1], metadata=[{"bucket": -1}])  # a write: the next search starts cold
                s.delete(tmp_id)
                t0 = time.perf_counter()
                first = s.search(queries[0], k=args.k, filter=flt)[0]
                cold_ms = (time.perf_counter() - t0) * 1000
                t0 = time.perf_counter()
                got = np.stack([first] + [s.search(q, k=args.k, filter=flt)[0] for q in queries[1:]])
                dt = time.perf_counter() - t0
                recall = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(got.astype(np.int64), gt)]))
                row = {
                    "selectivity": name,
                    "matching": int(mask.sum()),
                    "recall@10": recall,
                    "qps": (len(queries) - 1) / dt,
                    "first_query_ms": cold_ms,
                }
                rows.append(row)
                print(
                    f"filter {name:>5}: {row['matching']:6d} matching  recall@{args.k} {recall:.4f}  "
                    f"{row['qps']:7.1f} q/s (same filter again)  first query after a write {cold_ms:.1f} ms"
                )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"n": args.n, "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""Exact search: engramdb's flat scan against numpy and faiss IndexFlatIP.

Same process, same data (../shared/data/mixed-minilm-384, 200k x 384 real
MiniLM vectors), one query at a time and batches of 64, on 1 and 2 threads.
Reports queries/s and the ratio to faiss (higher is better for engramdb).

    python benches/exact.py [--n 200000] [--queries 256] [--out benches/out/exact.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

import engramdb

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mixed-minilm-384"


def timed(fn, reps: int) -> float:
    fn()  # warm up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import faiss
    from threadpoolctl import threadpool_limits

    base = np.load(DATA / "base.npy")[: args.n].astype(np.float32)
    queries = np.load(DATA / "queries.npy")[: args.queries]
    gt = np.load(DATA / "gt_ids.npy")[: args.queries, : args.k]
    k = args.k
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = engramdb.Store(Path(tmp) / "s", dim=base.shape[1], metric="ip", sync=False)
        t0 = time.perf_counter()
        store.add(base)
        load_s = time.perf_counter() - t0
        index = faiss.IndexFlatIP(base.shape[1])
        index.add(base)

        def np_search(q: np.ndarray) -> np.ndarray:
            s = q @ base.T
            part = np.argpartition(-s, k, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(s, part, 1), axis=1)
            return np.take_along_axis(part, order, 1)

        if args.n == 200_000:
            ids, _ = store.search(queries, k=k)
            recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids.astype(np.int64), gt)]))
            print(f"engramdb recall@{k} vs shared ground truth: {recall:.4f}")
        for threads in (1, 2):
            engramdb.set_num_threads(threads)
            faiss.omp_set_num_threads(threads)
            with threadpool_limits(threads):
                for batch in (1, 64):
                    qs = [queries[i : i + batch] for i in range(0, args.queries if batch > 1 else 64, batch)]
                    nq = sum(len(q) for q in qs)
                    res = {}
                    for name, fn in (
                        ("engramdb", lambda qs=qs: [store.search(q, k=k) for q in qs]),
                        ("faiss", lambda qs=qs: [index.search(q, k) for q in qs]),
                        ("numpy", lambda qs=qs: [np_search(q) for q in qs]),
                    ):
                        res[name] = nq / timed(fn, args.reps)
                    row = {"threads": threads, "batch": batch, **{f"{k_}_qps": v for k_, v in res.items()}}
                    row["engramdb_vs_faiss"] = res["engramdb"] / res["faiss"]
                    row["engramdb_vs_numpy"] = res["engramdb"] / res["numpy"]
                    rows.append(row)
                    print(
                        f"threads={threads} batch={batch:>2}: engramdb {res['engramdb']:8.1f} q/s  "
                        f"faiss {res['faiss']:8.1f} q/s  numpy {res['numpy']:8.1f} q/s  "
                        f"-> {row['engramdb_vs_faiss']:.2f}x faiss, {row['engramdb_vs_numpy']:.2f}x numpy"
                    )
        store.close()
    meta = {
        "n": args.n,
        "dim": int(base.shape[1]),
        "k": k,
        "kernel": engramdb.kernel_name(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_seconds": load_s,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
    }
    print(json.dumps(meta))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

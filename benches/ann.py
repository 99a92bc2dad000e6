"""ANN benchmark: engramdb's SPANN index (memory and disk modes) against
hnswlib (M=16, ef_construction=200), faiss HNSW32 and faiss IVF-Flat on the
shared MiniLM set (200k x 384, cosine).

    python benches/ann.py --data ../shared/data/mixed-minilm-384 --out benches

Queries run on one thread, in batches (every library gets the same batch
calls, so Python overhead is the same); builds use every core. Figures:
recall@10 against queries/s curves, build time, resident RAM of the index,
disk bytes, postings and bytes read per query. Writes benches/ann.json and
benches/ann.png; RESULTS-ann.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np


CACHE = os.environ.get("ANN_CACHE")  # keep peers' built indexes here between runs


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def recall(found: np.ndarray, gt: np.ndarray, k: int = 10) -> float:
    hit = 0
    for f, g in zip(found, gt):
        hit += len(set(f[:k].tolist()) & set(g[:k].tolist()))
    return hit / (len(gt) * k)


def timed(fn, q):
    t = time.perf_counter()
    out = fn(q)
    return out, len(q) / (time.perf_counter() - t)


def bench_spann(base, q, gt, work, results, threads_build):
    import engramdb
    from engramdb.spann import SpannIndex

    engramdb.set_num_threads(threads_build)
    path = os.path.join(work, "spann")
    r0 = rss()
    t = time.perf_counter()
    idx = SpannIndex.build(base, path, metric="cosine", progress=False, mode="memory")
    build = time.perf_counter() - t
    st = idx.stats()
    print(f"spann build {build:.1f}s {st}", flush=True)
    engramdb.set_num_threads(1)
    grid = [(16, 8), (32, 12), (48, 16), (64, 24), (96, 32), (128, 48), (192, 64)]
    for mode in ("memory", "disk", "disk-direct"):
        if mode == "memory":
            ix = idx
        else:
            ix = SpannIndex.open(path, mode="disk", direct_io=mode == "disk-direct")
            if mode == "disk-direct" and not ix.direct_io:
                print("O_DIRECT refused by the file system: skipping disk-direct", flush=True)
                continue
        s = ix.stats()
        pts = []
        qq = q[:500] if mode == "disk-direct" else q
        gg = gt[:500] if mode == "disk-direct" else gt
        for nprobe, cp in (grid[1:6] if mode == "disk-direct" else grid):
            (ids, _), qps = timed(lambda x: ix.search(x, k=10, nprobe=nprobe, coarse_probe=cp), qq)
            s2 = ix.stats()
            pts.append({
                "param": f"nprobe={nprobe},coarse={cp}", "recall": recall(ids, gg), "qps": qps,
                "postings_per_query": s2["last_postings_read"] / len(qq),
                "bytes_per_query": s2["last_bytes_read"] / len(qq),
            })
            print(mode, pts[-1], flush=True)
        # single-query latency at the default parameters (disk: warm page
        # cache; disk-direct: O_DIRECT reads, no page cache)
        lat = []
        for i in range(min(300 if mode == "disk-direct" else 1000, len(q))):
            t = time.perf_counter()
            ix.search(q[i], k=10)
            lat.append(time.perf_counter() - t)
        lat90 = []
        for i in range(min(300 if mode == "disk-direct" else 1000, len(q))):
            t = time.perf_counter()
            ix.search(q[i], k=10, nprobe=48, coarse_probe=16)
            lat90.append(time.perf_counter() - t)
        results[f"spann-{mode}"] = {
            "latency_ms_median_nprobe48": float(np.median(lat90) * 1e3),
            "build_s": build, "ram_bytes": s["ram_bytes"], "disk_bytes": s["disk_bytes"],
            "heads": s["heads"], "replicas": s["replicas"], "points": pts,
            "default_latency_ms_median": float(np.median(lat) * 1e3),
            "default_latency_ms_p99": float(np.percentile(lat, 99) * 1e3),
            "rss_delta_bytes": rss() - r0,
        }
    (ids, _) = idx.search(q, k=10)
    results["spann-memory"]["default_recall"] = recall(ids, gt)
    engramdb.set_num_threads(threads_build)


def bench_hnswlib(base, q, gt, work, results, threads_build):
    import hnswlib

    f = os.path.join(CACHE, "hnsw-M16-efc200.bin") if CACHE else os.path.join(work, "hnsw.bin")
    prev = results.get("hnswlib-M16", {})
    r0 = rss()
    p = hnswlib.Index(space="ip", dim=base.shape[1])
    if CACHE and os.path.exists(f) and "build_s" in prev:
        # a cached build from an earlier run of this script: reuse its build time
        p.load_index(f, max_elements=len(base))
        build, ram = prev["build_s"], prev["ram_bytes"]
    else:
        t = time.perf_counter()
        p.init_index(max_elements=len(base), ef_construction=200, M=16)
        p.set_num_threads(threads_build)
        p.add_items(base, np.arange(len(base)))
        build = time.perf_counter() - t
        ram = rss() - r0
        p.save_index(f)
    disk = os.path.getsize(f)
    print(f"hnswlib build {build:.1f}s", flush=True)
    p.set_num_threads(1)
    pts = []
    for ef in (10, 16, 24, 32, 48, 64, 96, 128, 256):
        p.set_ef(ef)
        (ids, _), qps = timed(lambda x: p.knn_query(x, k=10, num_threads=1), q)
        pts.append({"param": f"ef={ef}", "recall": recall(ids, gt), "qps": qps})
        print("hnswlib", pts[-1], flush=True)
    results["hnswlib-M16"] = {"build_s": build, "ram_bytes": ram, "disk_bytes": disk, "points": pts}
    del p


def bench_faiss(base, q, gt, work, results, threads_build):
    import faiss

    faiss.omp_set_num_threads(threads_build)
    d = base.shape[1]
    f = os.path.join(CACHE, "faiss-hnsw32.idx") if CACHE else os.path.join(work, "faiss-hnsw.idx")
    prev = results.get("faiss-HNSW32", {})
    r0 = rss()
    if CACHE and os.path.exists(f) and "build_s" in prev:
        h = faiss.read_index(f)
        build, ram = prev["build_s"], prev["ram_bytes"]
    else:
        t = time.perf_counter()
        h = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        h.add(base)
        build = time.perf_counter() - t
        ram = rss() - r0
        faiss.write_index(h, f)
    print(f"faiss hnsw build {build:.1f}s", flush=True)
    faiss.omp_set_num_threads(1)
    pts = []
    for ef in (16, 24, 32, 48, 64, 96, 128, 256):
        h.hnsw.efSearch = ef
        (_, ids), qps = timed(lambda x: h.search(x, 10), q)
        pts.append({"param": f"efSearch={ef}", "recall": recall(ids, gt), "qps": qps})
        print("faiss-hnsw", pts[-1], flush=True)
    results["faiss-HNSW32"] = {"build_s": build, "ram_bytes": ram, "disk_bytes": os.path.getsize(f), "points": pts}
    del h

    faiss.omp_set_num_threads(threads_build)
    nlist = 1024
    r0 = rss()
    t = time.perf_counter()
    quant = faiss.IndexFlatIP(d)
    ivf = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.train(base[np.random.default_rng(0).choice(len(base), 64 * nlist, replace=False)])
    ivf.add(base)
    build = time.perf_counter() - t
    ram = rss() - r0
    f = os.path.join(work, "faiss-ivf.idx")
    faiss.write_index(ivf, f)
    print(f"faiss ivf build {build:.1f}s", flush=True)
    faiss.omp_set_num_threads(1)
    pts = []
    for nprobe in (4, 8, 16, 24, 32, 48, 64, 128):
        ivf.nprobe = nprobe
        (_, ids), qps = timed(lambda x: ivf.search(x, 10), q)
        pts.append({"param": f"nprobe={nprobe}", "recall": recall(ids, gt), "qps": qps})
        print("faiss-ivf", pts[-1], flush=True)
    results["faiss-IVF1024-Flat"] = {"build_s": build, "ram_bytes": ram, "disk_bytes": os.path.getsize(f), "points": pts}


def plot(results, out_png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, r in results.items():
        if not isinstance(r, dict) or "points" not in r:
            continue
        pts = sorted(r["points"], key=lambda p: p["recall"])
        ax.plot([p["recall"] for p in pts], [p["qps"] for p in pts], marker="o", label=name)
    ax.set_xlabel("recall@10")
    ax.set_ylabel("queries/s (1 thread, log)")
    ax.set_yscale("log")
    ax.set_xlim(0.7, 1.0)
    ax.axvline(0.95, color="grey", lw=0.5, ls="--")
    ax.grid(True, which="both", lw=0.3)
    ax.set_title("mixed-minilm-384: 200k x 384, cosine, 2-core shared CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mixed-minilm-384"))
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--only", default="spann,hnswlib,faiss")
    ap.add_argument("--build-threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    base = np.load(os.path.join(a.data, "base.npy")).astype(np.float32)
    q = np.ascontiguousarray(np.load(os.path.join(a.data, "queries.npy"))[: a.queries], dtype=np.float32)
    gt = np.load(os.path.join(a.data, "gt_ids.npy"))[: a.queries, :10]
    out_json = os.path.join(a.out, "ann.json")
    results = json.load(open(out_json)) if os.path.exists(out_json) else {}
    results["_setup"] = {
        "n": int(base.shape[0]), "dim": int(base.shape[1]), "queries": int(len(q)),
        "machine": "2-core shared CPU", "cpus": os.cpu_count(), "build_threads": a.build_threads,
        "query_threads": 1, "f32_bytes": int(base.nbytes),
    }
    work = tempfile.mkdtemp(prefix="ann-bench-", dir=os.environ.get("BENCH_TMP", "/tmp"))
    try:
        for name in a.only.split(","):
            {"spann": bench_spann, "hnswlib": bench_hnswlib, "faiss": bench_faiss}[name](
                base, q, gt, work, results, a.build_threads)
            with open(out_json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plot(results, os.path.join(a.out, "ann.png"))
    print(f"wrote {out_json} and {os.path.join(a.out, 'ann.png')}")


if __name__ == "__main__":
    main()

"""diskannpy (DiskANN's SSD index) for benches/ann.py, run in its own venv:
diskannpy 0.7.0 pins numpy<2, which the main bench venv cannot have.

    python -m venv /tmp/diskann-venv && /tmp/diskann-venv/bin/pip install diskannpy==0.7.0
    /tmp/diskann-venv/bin/python benches/ann_diskann.py build --data DATA --dir DIR
    /tmp/diskann-venv/bin/python benches/ann_diskann.py serve --data DATA --dir DIR --queries 1000

`build` writes DIR/build.json (seconds, parameters). `serve` opens the disk
index, then answers one request per line on stdin: "COMPLEXITY BEAM" runs
every query once with batch_search on one thread and writes back one JSON
line {"ids": [[...]], "seconds": s, "read_bytes": b}; read_bytes is the
growth of /proc/self/io read_bytes (DiskANN reads nodes with O_DIRECT, so
these are device reads, never the page cache). "rss" answers the resident
set. An empty line or EOF ends it.

Found on this machine: opening a disk index with num_threads=1 hangs for
ever in PQFlashIndex::load (use_medoids_data_as_centroids -> read_nodes
waits in ScratchStoreManager on an empty queue of thread contexts), so the
index is opened with 2 thread contexts; searches still run on one thread
(batch_search(num_threads=1)).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

# the harness's /proc readers (ann.py needs only numpy and the standard library at import)
from ann import io_read_bytes as read_bytes
from ann import rss

# metric l2 on unit vectors orders neighbours exactly as cosine does
METRIC = "l2"
GRAPH_DEGREE = 32
BUILD_COMPLEXITY = 100
PQ_BYTES = 96  # in-memory PQ code per vector (384 dims -> 4 dims per byte)


def main() -> None:
    import diskannpy

    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["build", "serve"])
    ap.add_argument("--data", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cache-nodes", type=int, default=0)
    a = ap.parse_args()
    if a.step == "build":
        base = np.load(os.path.join(a.data, "base.npy")).astype(np.float32)
        if a.limit:
            base = base[: a.limit]
        os.makedirs(a.dir, exist_ok=True)
        # DiskANN sizes its PQ code from the search-memory budget: bytes per vector = budget / n
        budget_gb = PQ_BYTES * len(base) / 2**30
        t = time.perf_counter()
        diskannpy.build_disk_index(
            data=base, distance_metric=METRIC, index_directory=a.dir, complexity=BUILD_COMPLEXITY,
            graph_degree=GRAPH_DEGREE, search_memory_maximum=budget_gb, build_memory_maximum=8.0,
            num_threads=a.threads, vector_dtype=np.float32)
        build = time.perf_counter() - t
        info = {"build_s": build, "n": len(base), "metric": METRIC, "graph_degree": GRAPH_DEGREE,
                "build_complexity": BUILD_COMPLEXITY, "pq_bytes_target": PQ_BYTES, "build_threads": a.threads,
                "diskannpy": getattr(diskannpy, "__version__", "0.7.0"), "numpy": np.__version__}
        with open(os.path.join(a.dir, "build.json"), "w") as f:
            json.dump(info, f)
        print(json.dumps(info), flush=True)
        return
    q = np.ascontiguousarray(np.load(os.path.join(a.data, "queries.npy"))[: a.queries], dtype=np.float32)
    r0 = rss()
    ix = diskannpy.StaticDiskIndex(index_directory=a.dir, num_threads=2, num_nodes_to_cache=a.cache_nodes,
                                   distance_metric=METRIC, vector_dtype=np.float32, dimensions=q.shape[1])
    out = sys.stdout
    print(json.dumps({"ready": True, "open_rss_bytes": rss() - r0, "rss_bytes": rss()}), file=out, flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            break
        if line == "rss":
            print(json.dumps({"rss_bytes": rss()}), file=out, flush=True)
            continue
        complexity, beam = (int(v) for v in line.split())
        b0 = read_bytes()
        t = time.perf_counter()
        ids, _ = ix.batch_search(q, k_neighbors=10, complexity=complexity, num_threads=1, beam_width=beam)
        sec = time.perf_counter() - t
        print(json.dumps({"ids": np.asarray(ids).astype(np.int64).tolist(), "seconds": sec,
                          "read_bytes": read_bytes() - b0}), file=out, flush=True)


if __name__ == "__main__":
    main()

"""ANN benchmark: engramdb's SPANN index (memory and disk modes) against
hnswlib (M=16, ef_construction=200), faiss HNSW32, faiss IVF-Flat (in RAM and
with on-disk, mmapped inverted lists), usearch (HNSW), LanceDB's IVF_PQ and
diskannpy's SSD index on the shared MiniLM set (200k x 384, cosine).

    python benches/ann.py --data ../shared/data/mixed-minilm-384 --out benches
    python benches/ann.py --only hnswlib,faiss,usearch,faiss-ondisk,lancedb,diskann ...

diskannpy needs numpy<2, so it runs in its own venv (benches/ann_diskann.py,
interpreter from ANN_DISKANN_PYTHON, default /tmp/diskann-venv/bin/python) as
a subprocess that ann.py drives point by point, interleaved like the rest.

Queries run on one thread, in batches (every library gets the same batch
calls, so Python overhead is the same), except LanceDB, searched one query
per call as an embedded store's caller does, with its thread pools set to
one thread and pinned to one CPU; builds use every core. Figures:
recall@10 against queries/s curves, build time, resident RAM of the index,
disk bytes, postings and bytes read per query. Writes benches/ann.json and
benches/ann.png; benches/RESULTS.md quotes them.
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


class System:
    """One index under test: build info plus (label, search function) points."""

    def __init__(self, name, info, points, extra=None):
        self.name, self.info, self.points, self.extra = name, info, points, extra or {}


def _spann_point(ix, nprobe, coarse):
    def run(x):
        return ix.search(x, k=10, nprobe=nprobe, coarse_probe=coarse)[0]

    return run


def setup_spann(base, work, threads_build):
    import engramdb
    from engramdb.spann import SpannIndex

    engramdb.set_num_threads(threads_build)
    path = os.path.join(work, "spann")
    t = time.perf_counter()
    idx = SpannIndex.build(base, path, metric="cosine", progress=False, mode="memory")
    build = time.perf_counter() - t
    engramdb.set_num_threads(1)
    print(f"spann build {build:.1f}s {idx.stats()}", flush=True)
    # (nprobe, coarse_probe): both knobs, the plot and the figures take the Pareto frontier
    grid = [(16, 8), (24, 12), (32, 16), (40, 24), (40, 32), (48, 24), (48, 32), (48, 40), (56, 36), (56, 40),
            (64, 40), (72, 48), (96, 48), (128, 64)]
    dp = idx.params()
    out = []
    for mode in ("memory", "disk"):
        ix = idx if mode == "memory" else SpannIndex.open(path, mode="disk", read_only=True)
        st = ix.stats()
        pts = [(f"nprobe={n},coarse={c}", _spann_point(ix, n, c)) for n, c in grid]
        out.append(System(f"spann-{mode}", {
            "build_s": build, "ram_bytes": st["ram_bytes"], "disk_bytes": st["disk_bytes"],
            "heads": st["heads"], "replicas": st["replicas"],
            "defaults": f"nprobe={dp['nprobe']},coarse={dp['coarse_probe']},rerank={dp['rerank']}"}, pts,
            {"index": ix}))
    return out, path


def setup_hnswlib(base, work, threads_build, results, tag=""):
    import hnswlib

    f = os.path.join(CACHE, f"hnsw-M16-efc200{tag}.bin") if CACHE else os.path.join(work, "hnsw.bin")
    prev = results.get("hnswlib-M16", {})
    r0 = rss()
    p = hnswlib.Index(space="ip", dim=base.shape[1])
    if CACHE and os.path.exists(f) and "build_s" in prev:
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
    print(f"hnswlib build {build:.1f}s", flush=True)
    p.set_num_threads(1)

    def at(ef):
        def run(x):
            p.set_ef(ef)
            return p.knn_query(x, k=10, num_threads=1)[0]
        return run

    # as dense as SPANN's grid around recall 0.95 (ef 40-64), so neither frontier is a coarser interpolation
    pts = [(f"ef={ef}", at(ef)) for ef in (16, 24, 32, 40, 48, 56, 64, 80, 96, 128, 256)]
    return [System("hnswlib-M16", {"build_s": build, "ram_bytes": ram, "disk_bytes": os.path.getsize(f)}, pts)]


def setup_faiss(base, work, threads_build, results, tag=""):
    import faiss

    faiss.omp_set_num_threads(threads_build)
    d = base.shape[1]
    f = os.path.join(CACHE, f"faiss-hnsw32{tag}.idx") if CACHE else os.path.join(work, "faiss-hnsw.idx")
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

    def hat(ef):
        def run(x):
            h.hnsw.efSearch = ef
            return h.search(x, 10)[1]
        return run

    out = [System("faiss-HNSW32", {"build_s": build, "ram_bytes": ram, "disk_bytes": os.path.getsize(f)},
                  [(f"efSearch={ef}", hat(ef)) for ef in (16, 24, 32, 48, 64, 96, 128, 256)])]
    nlist = 1024 if len(base) >= 64 * 1024 else 32
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

    def iat(n):
        def run(x):
            ivf.nprobe = n
            return ivf.search(x, 10)[1]
        return run

    out.append(System(f"faiss-IVF{nlist}-Flat", {"build_s": build, "ram_bytes": ram, "disk_bytes": os.path.getsize(f)},
                      [(f"nprobe={n}", iat(n)) for n in (8, 16, 24, 32, 48, 64, 128)]))
    faiss.omp_set_num_threads(1)
    return out


def rss_parts() -> dict:
    """Resident set split into anonymous memory and file pages mapped in
    (mmapped index files count under `file`)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            for key, name in (("VmRSS:", "total"), ("RssAnon:", "anon"), ("RssFile:", "file")):
                if line.startswith(key):
                    out[name] = int(line.split()[1]) * 1024
    return out


def io_read_bytes() -> int:
    """Bytes this process made the kernel read from the block device."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def mapping_rss(path) -> int:
    """Resident bytes of this process's mappings of one file (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(head[1]) * 1024
    return total


def _device_of(path) -> str:
    """/sys/dev/block entry of the disk (not the partition) holding `path`."""
    st = os.stat(path)
    dev = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    part = os.path.realpath(dev)
    return os.path.dirname(part) if os.path.exists(os.path.join(part, "partition")) else part


def dir_bytes(path, skip=()) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            if name not in skip:
                total += os.path.getsize(os.path.join(root, name))
    return total


def cached(name, work):
    """Where a peer's built index lives: under ANN_CACHE when set (kept between
    runs), else in this run's scratch folder."""
    return os.path.join(CACHE, name) if CACHE else os.path.join(work, name)


def setup_usearch(base, work, threads_build, results):
    """usearch HNSW: connectivity 16 and expansion_add 200 (hnswlib's M and
    ef_construction here; usearch's defaults are 16 and 128), f32 storage,
    inner product on the unit vectors."""
    from usearch.index import Index

    f = cached(f"usearch-c16-ea200-f32-{len(base)}.usearch", work)
    prev = results.get("usearch-c16", {})
    r0 = rss()
    ix = Index(ndim=base.shape[1], metric="ip", dtype="f32", connectivity=16, expansion_add=200)
    if os.path.exists(f) and "build_s" in prev:
        ix.load(f)
        build, ram = prev["build_s"], prev["ram_bytes"]
    else:
        t = time.perf_counter()
        ix.add(np.arange(len(base), dtype=np.uint64), base, threads=threads_build)
        build = time.perf_counter() - t
        ram = rss() - r0
        ix.save(f)
    print(f"usearch build {build:.1f}s", flush=True)

    def at(ef):
        def run(x):
            ix.expansion_search = ef
            return ix.search(x, 10, threads=1).keys.astype(np.int64)
        return run

    pts = [(f"expansion_search={ef}", at(ef)) for ef in (16, 24, 32, 48, 64, 96, 128, 256)]
    return [System("usearch-c16", {"build_s": build, "ram_bytes": ram, "disk_bytes": os.path.getsize(f),
                                   "params": "connectivity=16, expansion_add=200, dtype=f32, metric=ip"}, pts)]


def _ivf_train_sample(base, nlist):
    return base[np.random.default_rng(0).choice(len(base), min(len(base), 64 * nlist), replace=False)]


def setup_faiss_ondisk(base, work, threads_build, results):
    """faiss IVF-Flat whose inverted lists live in a file (OnDiskInvertedLists,
    built the way faiss.contrib.ondisk.merge_ondisk does: add to a shard,
    merge its lists into the on-disk file) and are mmapped at search time.
    The trained quantizer (nlist centroids) is the only part read into RAM."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    faiss.omp_set_num_threads(threads_build)
    d = base.shape[1]
    nlist = 1024 if len(base) >= 64 * 1024 else 32
    name = f"faiss-IVF{nlist}-Flat-ondisk"
    folder = cached(f"faiss-ivf{nlist}-ondisk-{len(base)}", work)
    fidx, fdata = os.path.join(folder, "populated.index"), os.path.join(folder, "lists.ivfdata")
    prev = results.get(name, {})
    if not (os.path.exists(fidx) and "build_s" in prev and prev.get("n") == len(base)):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        t = time.perf_counter()
        trained = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        trained.train(_ivf_train_sample(base, nlist))
        shard = faiss.clone_index(trained)
        shard.add(base)
        fshard = os.path.join(work, "ivf-shard.index")
        faiss.write_index(shard, fshard)
        del shard
        merge_ondisk(trained, [fshard], fdata)
        faiss.write_index(trained, fidx)
        del trained
        os.remove(fshard)
        build = time.perf_counter() - t
    else:
        build = prev["build_s"]
    print(f"faiss ivf on-disk build {build:.1f}s", flush=True)
    faiss.omp_set_num_threads(1)
    before = rss_parts()
    ivf = faiss.read_index(fidx, faiss.IO_FLAG_ONDISK_SAME_DIR)
    opened = rss_parts()
    inv = faiss.extract_index_ivf(ivf).invlists
    sizes = np.array([inv.list_size(i) for i in range(nlist)], dtype=np.int64)
    entry = d * 4 + 8  # a float32 vector and its int64 id

    def iat(n):
        def run(x):
            ivf.nprobe = n
            return ivf.search(x, 10)[1]
        return run

    info = {"build_s": build, "n": len(base), "disk_bytes": os.path.getsize(fidx) + os.path.getsize(fdata),
            "ram_bytes": opened["anon"] - before["anon"], "ivfdata": fdata, "list_entry_bytes": entry,
            "note": "ram_bytes: anonymous memory the opened index holds (quantizer, list table); the lists are "
                    "mmapped file pages, counted under lists_resident_bytes_warm after the timed rounds"}
    pts = [(f"nprobe={n}", iat(n)) for n in (8, 16, 24, 32, 48, 64, 128)]
    return [System(name, info, pts, {"index": ivf, "sizes": sizes})]


def ondisk_extras(results, system, q, gt):
    """On-disk IVF: bytes of inverted lists scanned per query (from the list
    sizes of the probed lists), the mmapped file pages resident after the warm
    sweep, then a page-cache-cold run: before every query the file's pages are
    unmapped from this process (madvise MADV_DONTNEED on the mapping) and
    dropped from the page cache (posix_fadvise POSIX_FADV_DONTNEED on the file
    only, nothing else on the machine), so each query faults its lists in from
    the device; 200 queries one at a time, device bytes from /proc/self/io.
    Run twice: with the kernel's default read-around on page faults (the
    device's read_ahead_kb, 8 MiB on this VM's virtio disk) and with
    MADV_RANDOM on the mapping (page-sized faults, no read-around)."""
    import ctypes

    ivf, sizes = system.extra["index"], system.extra["sizes"]
    r = results[system.name]
    entry = r["list_entry_bytes"]
    quant = ivf.quantizer
    for p in r["points"]:
        n = int(p["param"].split("=")[1])
        _, lists = quant.search(q, n)
        p["lists_per_query"] = n
        p["bytes_per_query"] = float(sizes[lists].sum() * entry / len(q))
    fdata = r["ivfdata"]
    r["lists_resident_bytes_warm"] = mapping_rss(fdata)
    span = None
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(fdata):
                lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                span = (lo, hi - lo) if span is None else (min(span[0], lo), max(span[0] + span[1], hi) - min(span[0], lo))
    if span is None:
        print("on-disk lists not found in /proc/self/maps: no cold figures", flush=True)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fd = os.open(fdata, os.O_RDONLY)
    MADV_DONTNEED = 4

    def drop():
        if libc.madvise(span[0], span[1], MADV_DONTNEED) != 0:
            raise OSError(ctypes.get_errno(), "madvise")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    qq, gg = q[:200], gt[:200]
    try:
        with open("/sys/block/" + os.path.basename(os.path.realpath(_device_of(fdata))) + "/queue/read_ahead_kb") as f:
            ra_kb = int(f.read())
    except (OSError, ValueError):
        ra_kb = None
    MADV_RANDOM, MADV_NORMAL = 1, 0
    try:
        for suffix, advice in (("-cold", MADV_NORMAL), ("-cold-madv-random", MADV_RANDOM)):
            libc.madvise(span[0], span[1], advice)
            pts = []
            for n in (16, 32, 64):
                ivf.nprobe = n
                lat, found, dev = [], [], 0
                for x in qq:
                    drop()
                    b0 = io_read_bytes()
                    t = time.perf_counter()
                    found.append(ivf.search(x[None, :], 10)[1][0])
                    lat.append(time.perf_counter() - t)
                    dev += io_read_bytes() - b0
                pts.append({"param": f"nprobe={n}", "recall": recall(np.array(found), gg),
                            "qps": len(qq) / sum(lat), "latency_ms_median": float(np.median(lat) * 1e3),
                            "latency_ms_p99": float(np.percentile(lat, 99) * 1e3),
                            "device_bytes_per_query": dev / len(qq)})
                print("faiss on-disk" + suffix, pts[-1], flush=True)
            results[system.name + suffix] = {k: v for k, v in r.items() if k != "points"} | {
                "points": pts, "read_ahead_kb": ra_kb,
                "note": "file pages unmapped and dropped from the page cache before every query; 200 queries one "
                        "at a time; " + ("default read-around" if advice == MADV_NORMAL else "MADV_RANDOM")}
        libc.madvise(span[0], span[1], MADV_NORMAL)
    finally:
        os.close(fd)


LANCE_THREAD_ENV = {"LANCE_CPU_THREADS": "1", "LANCE_IO_THREADS": "1"}


def _lance_build(folder, data, limit, threads):
    """Run in a child process (see main): builds the LanceDB table and its
    IVF_PQ index with LanceDB's defaults (cosine), using `threads` cores."""
    import lancedb
    import pyarrow as pa

    base = np.load(os.path.join(data, "base.npy")).astype(np.float32)
    if limit:
        base = base[:limit]
    shutil.rmtree(folder, ignore_errors=True)
    t = time.perf_counter()
    db = lancedb.connect(folder)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(base.ravel(), pa.float32()), base.shape[1])
    tab = db.create_table("vectors", data=pa.table({"id": pa.array(np.arange(len(base)), pa.int64()), "vector": vec}))
    load = time.perf_counter() - t
    from lancedb.index import IvfPq

    tab.create_index("vector", config=IvfPq(distance_type="cosine"))
    build = time.perf_counter() - t
    ix = tab.list_indices()[0]
    info = {"build_s": build, "load_s": load, "n": len(base), "build_threads": threads,
            "index_bytes": int(getattr(ix, "size_bytes", 0) or 0), "index_details": str(getattr(ix, "index_details", ""))}
    with open(os.path.join(folder, "build.json"), "w") as f:
        json.dump(info, f)
    print("lancedb build", json.dumps(info), flush=True)


def _pin_all_threads(cpus):
    """Set the CPU affinity of every thread of this process (Lance's tokio and
    CPU pools included)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:
            pass


def _current_cpu() -> int:
    with open("/proc/thread-self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[36])


def setup_lancedb(base, work, threads_build, results, data, limit):
    """LanceDB (embedded) table + IVF_PQ index, LanceDB defaults, cosine.
    Built in a child process with every core; searched here, one query per
    call (what an embedded store's caller does), with LANCE_CPU_THREADS=1,
    LANCE_IO_THREADS=1 and every thread of the process pinned to one CPU while
    Lance's points run, so its thread pools share one core."""
    import subprocess
    import sys

    folder = cached(f"lancedb-ivfpq-default-{len(base)}", work)
    if not os.path.exists(os.path.join(folder, "build.json")):
        env = dict(os.environ)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--lance-build", folder, "--data", data,
                        "--limit", str(limit), "--build-threads", str(threads_build)], check=True, env=env)
    with open(os.path.join(folder, "build.json")) as f:
        info = json.load(f)
    print(f"lancedb build {info['build_s']:.1f}s", flush=True)
    os.environ.update(LANCE_THREAD_ENV)
    import lancedb

    r0 = rss_parts()
    tab = lancedb.connect(folder).open_table("vectors")
    cpu = {_current_cpu()}
    every = set(range(os.cpu_count() or 1))

    def at(nprobes, refine):
        def run(x):
            _pin_all_threads(cpu)
            try:
                out = np.empty((len(x), 10), dtype=np.int64)
                for i, v in enumerate(x):
                    b = tab.search(v).distance_type("cosine").nprobes(nprobes)
                    if refine > 1:
                        b = b.refine_factor(refine)
                    ids = b.limit(10).select(["id", "_distance"]).to_arrow()["id"].to_numpy()
                    out[i, : len(ids)] = ids
                    out[i, len(ids):] = -1
                return out
            finally:
                _pin_all_threads(every)
        return run

    # the grid is set for the 24 partitions LanceDB's defaults make at 200k and scaled to the count it made
    # (about n / 8,200: 122 at 1M)
    import re

    probe = tab.search(np.asarray(base[0])).distance_type("cosine").limit(10).select(["id", "_distance"])
    found = re.findall(r"partitions_ranked=(\d+)", probe.analyze_plan())
    parts = int(found[0]) if found else 24
    info["partitions"] = parts

    def scaled(n):
        return n if n == 1 else max(1, round(n * parts / 24))

    grid = dict.fromkeys((scaled(n), r) for n, r in
                         ((1, 1), (24, 1), (4, 20), (8, 20), (16, 20), (8, 40), (16, 40), (24, 40)))
    pts = [(f"nprobes={n},refine={r}", at(n, r)) for n, r in grid]
    # warm Lance's index cache the way a long-running process would have it (the defaults made 24
    # partitions on the 200k set: nprobes 24 searches all of them)
    at(1024, 1)(np.asarray(base[:200]))
    r1 = rss_parts()
    info = dict(info, disk_bytes=dir_bytes(folder, skip=("build.json",)), ram_bytes=r1["anon"] - r0["anon"],
                threads="LANCE_CPU_THREADS=1 LANCE_IO_THREADS=1, all threads pinned to one CPU while searching",
                note="ram_bytes: growth of anonymous memory after opening the table and 200 warm-up queries "
                     "probing every partition (index cache filled); vectors for refine are read from the table's files")
    return [System("lancedb-IVF_PQ", info, pts, {"table": tab})]


def _plan_reads(text: str) -> tuple[float, float]:
    """Sum bytes_read and iops over every operator of a Lance analyze_plan."""
    import re

    mult = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}
    b = sum(float(v) * mult[u] for v, u in re.findall(r"bytes_read=([\d.]+) ?([KMG]?)", text))
    io = sum(float(v) * mult[u] for v, u in re.findall(r"\biops=([\d.]+) ?([KMG]?)", text))
    return b, io


def lance_extras(results, system, q):
    """Reads per query from Lance's own metrics (analyze_plan: bytes_read and
    iops summed over the plan), 50 queries per point, index cache warm."""
    tab = system.extra["table"]
    for p in results[system.name]["points"]:
        n, r = (int(v.split("=")[1]) for v in p["param"].split(","))
        tb = ti = 0.0
        for v in q[:50]:
            b = tab.search(v).distance_type("cosine").nprobes(n)
            if r > 1:
                b = b.refine_factor(r)
            got = _plan_reads(b.limit(10).select(["id", "_distance"]).analyze_plan())
            tb, ti = tb + got[0], ti + got[1]
        p["bytes_per_query"], p["iops_per_query"] = tb / 50, ti / 50


DISKANN_PY = os.environ.get("ANN_DISKANN_PYTHON", "/tmp/diskann-venv/bin/python")


class _DiskannServer:
    def __init__(self, folder, data, nq):
        import subprocess

        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ann_diskann.py")
        self.p = subprocess.Popen([DISKANN_PY, script, "serve", "--data", data, "--dir", folder,
                                   "--queries", str(nq)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self.ready = self._reply()

    def _reply(self):
        # DiskANN's C++ code logs to stdout as well: our replies are the JSON lines
        for line in self.p.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError("diskann server ended")

    def ask(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self._reply()

    def close(self):
        try:
            self.p.stdin.write("\n")
            self.p.stdin.flush()
            self.p.wait(timeout=30)
        except Exception:
            self.p.kill()


def setup_diskann(base, work, threads_build, results, data, nq, limit):
    """diskannpy 0.7.0 disk index (Vamana R=32, L=100, PQ codes in RAM, full
    vectors in the on-disk graph nodes, read with O_DIRECT) in its own venv;
    searched one thread (batch_search num_threads=1), beam width 2 and 4."""
    import subprocess

    if not os.path.exists(DISKANN_PY):
        print(f"diskann: {DISKANN_PY} missing, skipped", flush=True)
        return []
    folder = cached(f"diskann-R32-L100-pq96-{len(base)}", work)
    if not os.path.exists(os.path.join(folder, "build.json")):
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ann_diskann.py")
        subprocess.run([DISKANN_PY, script, "build", "--data", data, "--dir", folder, "--limit", str(limit),
                        "--threads", str(threads_build)], check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(folder, "build.json")) as f:
        info = json.load(f)
    print(f"diskann build {info['build_s']:.1f}s", flush=True)
    srv = _DiskannServer(folder, data, nq)
    reads = {}

    def at(L, beam):
        def run(x):
            assert len(x) == nq
            rep = srv.ask(f"{L} {beam}")
            reads[(L, beam)] = rep["read_bytes"] / nq
            return np.array(rep["ids"], dtype=np.int64)
        return run

    pts = [(f"L={L},beam={bw}", at(L, bw)) for bw in (2,) for L in (10, 16, 24, 32, 48, 64, 96, 128)]
    pts += [(f"L={L},beam=4", at(L, 4)) for L in (32, 64)]
    at(128, 2)(np.empty((nq, 1)))
    ram = srv.ask("rss")["rss_bytes"] - srv.ready["rss_bytes"] + srv.ready["open_rss_bytes"]
    info = dict(info, disk_bytes=dir_bytes(folder, skip=("build.json", "ann_vectors.bin", "ann_mem.index.data")), ram_bytes=ram,
                note="ram_bytes: resident growth of the diskann process from opening the index through a warm-up "
                     "sweep; disk_bytes: the index folder less two build leftovers search never opens (ann_vectors.bin, the input copy, and ann_mem.index.data)")
    return [System("diskann-ssd", info, pts, {"server": srv, "reads": reads})]


def measure(systems, q, gt, rounds):
    """Best-of-`rounds` queries/s per point, the systems interleaved in each
    round so that load from other processes on the shared CPU hits them all
    alike; recall from the last round."""
    best: dict = {}
    for r in range(rounds):
        for s in systems:
            for label, fn in s.points:
                t = time.perf_counter()
                ids = fn(q)
                qps = len(q) / (time.perf_counter() - t)
                key = (s.name, label)
                rec = recall(ids, gt)
                if key not in best or qps > best[key]["qps"]:
                    best[key] = {"param": label, "recall": rec, "qps": qps}
        print(f"round {r + 1}/{rounds} done", flush=True)
    return best


def disk_extras(results, path, q, gt):
    """Disk mode: bytes and postings per query (page cache warm), then
    O_DIRECT reads (no page cache) with latency per query."""
    from engramdb.spann import SpannIndex

    ix = SpannIndex.open(path, mode="disk", read_only=True)
    for p in results["spann-disk"]["points"]:
        n, c = [int(v.split("=")[1]) for v in p["param"].split(",")]
        ix.search(q, k=10, nprobe=n, coarse_probe=c)
        st = ix.stats()
        p["postings_per_query"] = st["last_postings_read"] / len(q)
        p["bytes_per_query"] = st["last_bytes_read"] / len(q)
    d = SpannIndex.open(path, mode="disk", direct_io=True, read_only=True)
    if not d.direct_io:
        print("O_DIRECT refused by the file system: no cold-read figures", flush=True)
        return
    qq, gg = q[:300], gt[:300]
    pts = []
    for n, c in ((16, 8), (24, 12), (32, 16), (48, 20), (56, 24)):
        lat, found = [], []
        for x in qq:
            t = time.perf_counter()
            i, _ = d.search(x, k=10, nprobe=n, coarse_probe=c)
            lat.append(time.perf_counter() - t)
            found.append(i)
        st = d.stats()
        pts.append({"param": f"nprobe={n},coarse={c}", "recall": recall(np.array(found), gg),
                    "qps": len(qq) / sum(lat), "latency_ms_median": float(np.median(lat) * 1e3),
                    "latency_ms_p99": float(np.percentile(lat, 99) * 1e3),
                    "bytes_last_query": st["last_bytes_read"], "postings_last_query": st["last_postings_read"]})
        print("disk-direct", pts[-1], flush=True)
    results["spann-disk-direct"] = dict(results["spann-disk"], points=pts, note="O_DIRECT, 300 queries, one at a time")


def churn(base, q, gt, work, build_threads):
    """SPFresh-style churn on the real data: delete 50% of the vectors,
    re-insert them in batches of 10k (flushing each), compact; recall@10 and
    disk bytes at each step against a fresh build."""
    import engramdb
    from engramdb.spann import SpannIndex

    engramdb.set_num_threads(build_threads)
    path = os.path.join(work, "churn")
    idx = SpannIndex.build(base, path, metric="cosine", progress=False)
    out = {"fresh": {"recall": recall(idx.search(q)[0], gt), "disk_bytes": idx.stats()["disk_bytes"]}}
    ids = np.arange(len(base), dtype=np.uint64)
    gone = ids[::2]
    t = time.perf_counter()
    idx.delete(gone)
    idx.flush()
    out["deleted_half"] = {"recall_vs_full_gt": recall(idx.search(q)[0], gt), "disk_bytes": idx.stats()["disk_bytes"]}
    for s in range(0, len(gone), 10_000):
        b = gone[s:s + 10_000]
        idx.add(base[b.astype(np.int64)], b)
        idx.flush()
    reinsert = time.perf_counter() - t
    st = idx.stats()
    out["reinserted"] = {"recall": recall(idx.search(q)[0], gt), "disk_bytes": st["disk_bytes"],
                         "heads": st["heads"], "seconds": reinsert}
    t = time.perf_counter()
    rep = idx.compact()
    st = idx.stats()
    out["compacted"] = {"recall": recall(idx.search(q)[0], gt), "disk_bytes": st["disk_bytes"],
                        "heads": st["heads"], "seconds": time.perf_counter() - t, "report": rep}
    out["live_f32_bytes"] = int(base.nbytes)
    print("churn", json.dumps(out), flush=True)
    engramdb.set_num_threads(1)
    return out


def derive(base, n, seed=20251125):
    """A larger set derived from the real one: the base itself plus copies of
    random base rows with Gaussian noise (sigma 0.03 per component, ~0.59 in
    norm before renormalising, so a copy keeps cosine ~0.86 to its source),
    renormalised. Synthetic neighbours of real points, not new real texts."""
    rng = np.random.default_rng(seed)
    extra = n - len(base)
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    out[: len(base)] = base
    for s in range(0, extra, 100_000):
        m = min(100_000, extra - s)
        src = base[rng.integers(0, len(base), m)]
        v = src + 0.03 * rng.standard_normal(src.shape).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        out[len(base) + s: len(base) + s + m] = v
    return out


def derived_run(base, q, work, n, build_threads):
    """SPANN only on the derived set (peers' builds do not fit the time on
    two cores): build time, RAM, disk, recall/qps in memory and disk mode,
    O_DIRECT latency; ground truth by brute force for the queries given."""
    import engramdb
    from engramdb.spann import SpannIndex

    big = derive(base, n)
    sims = np.concatenate([q @ big[s:s + 200_000].T for s in range(0, len(big), 200_000)], axis=1)
    gt = np.argsort(-sims, axis=1)[:, :10]
    del sims
    engramdb.set_num_threads(build_threads)
    path = os.path.join(work, "derived")
    t = time.perf_counter()
    SpannIndex.build(big, path, metric="cosine", progress=False).close()
    build = time.perf_counter() - t
    engramdb.set_num_threads(1)
    out = {"n": n, "build_s": build, "f32_bytes": int(big.nbytes), "queries": len(q)}
    del big
    for mode, direct in (("memory", False), ("disk", False), ("disk-direct", True)):
        ix = SpannIndex.open(path, mode="memory" if mode == "memory" else "disk", direct_io=direct, read_only=True)
        st = ix.stats()
        pts = []
        for nprobe, cp in ((32, 16), (48, 20), (72, 28), (88, 36)):
            lat, found = [], []
            for x in q:
                t = time.perf_counter()
                i, _ = ix.search(x, k=10, nprobe=nprobe, coarse_probe=cp)
                lat.append(time.perf_counter() - t)
                found.append(i)
            pts.append({"param": f"nprobe={nprobe},coarse={cp}", "recall": recall(np.array(found), gt),
                        "qps": len(q) / sum(lat), "latency_ms_median": float(np.median(lat) * 1e3)})
            print("derived", mode, pts[-1], flush=True)
        out[mode] = {"ram_bytes": st["ram_bytes"], "disk_bytes": st["disk_bytes"], "heads": st["heads"],
                     "replicas": st["replicas"], "points": pts}
        ix.close()
    print("derived", json.dumps({k: v for k, v in out.items() if k not in ("memory", "disk", "disk-direct")}), flush=True)
    return out


def derived_peers(base, q, work, n, names, build_threads, rounds, results):
    """Peers on the derived set (`--derived N --only usearch,faiss-ondisk,...`):
    same set and brute-force ground truth as derived_run, the set written to a
    scratch folder (child-process builds read it from there), builds cached
    under ANN_CACHE with N in their names; same interleaved best-of-rounds
    timing as the 200k run. Stored under results["derived-N-peers"]."""
    big = derive(base, n)
    sims = np.concatenate([q @ big[s:s + 200_000].T for s in range(0, len(big), 200_000)], axis=1)
    gt = np.argsort(-sims, axis=1)[:, :10]
    del sims
    data = os.path.join(work, "derived-data")
    os.makedirs(data)
    np.save(os.path.join(data, "base.npy"), big)
    np.save(os.path.join(data, "queries.npy"), q)
    prev = results.get(f"derived-{n}-peers", {})
    systems = []
    for name in names:
        if name == "spann":  # memory and warm disk mode, timed interleaved with the peers
            got, _ = setup_spann(big, work, build_threads)
            systems += got
        elif name == "hnswlib":
            systems += setup_hnswlib(big, work, build_threads, prev, tag=f"-{n}")
        elif name == "faiss":  # HNSW32 and IVF-Flat in RAM
            systems += setup_faiss(big, work, build_threads, prev, tag=f"-{n}")
        elif name == "usearch":
            systems += setup_usearch(big, work, build_threads, prev)
        elif name == "faiss-ondisk":
            systems += setup_faiss_ondisk(big, work, build_threads, prev)
        elif name == "lancedb":
            systems += setup_lancedb(big, work, build_threads, prev, data, 0)
        elif name == "diskann":
            systems += setup_diskann(big, work, build_threads, prev, data, len(q), 0)
        else:
            raise SystemExit(f"{name}: not available with --derived")
    del big
    best = measure(systems, q, gt, rounds)
    out = dict(prev, n=n, queries=len(q))
    for s in systems:
        out[s.name] = dict(s.info, points=[best[(s.name, label)] for label, _ in s.points])
        if s.name == "diskann-ssd":
            s.extra["server"].close()
        elif s.name.startswith("faiss-IVF") and s.name.endswith("-ondisk"):
            ondisk_extras(out, s, q, gt)
        elif s.name == "lancedb-IVF_PQ":
            lance_extras(out, s, q)
    print("derived peers", json.dumps({k: {a: b for a, b in v.items() if a != "points"} if isinstance(v, dict) else v
                                       for k, v in out.items()}), flush=True)
    return out


def plot(results, out_png, title="mixed-minilm-384: 200k x 384, cosine, 2-core shared CPU"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6.5))
    series = [(name, r) for name, r in results.items() if isinstance(r, dict) and "points" in r]
    colors = list(plt.get_cmap("tab10").colors) + ["#000000", "#e6194b", "#3cb44b", "#911eb4", "#f58231"]
    markers = "osD^v<>pPX*h"
    for i, (name, r) in enumerate(series):
        # the Pareto frontier (a point is drawn unless another is both faster and at least as accurate), as
        # ann-benchmarks draws it; all points stay in ann.json
        pts, top = [], -1.0
        for p in sorted(r["points"], key=lambda p: (-p["recall"], -p["qps"])):
            if p["qps"] > top:
                pts.append(p)
                top = p["qps"]
        pts.reverse()
        # SPANN solid and thick; peers thinner; series whose every read goes to the device dashed
        # (O_DIRECT: SPANN direct, DiskANN; faiss on-disk with the page cache dropped per query)
        style = "--" if ("direct" in name or "cold" in name or name.startswith("diskann")) else "-"
        lw = 2.2 if name.startswith("spann") else 1.2
        ax.plot([p["recall"] for p in pts], [p["qps"] for p in pts], marker=markers[i % len(markers)], ms=4,
                ls=style, lw=lw, color=colors[i % len(colors)], label=name)
    ax.set_xlabel("recall@10")
    ax.set_ylabel("queries/s (1 thread, log; Pareto frontier of each index)")
    ax.set_yscale("log")
    ax.set_xlim(0.7, 1.0)
    ax.axvline(0.95, color="grey", lw=0.5, ls="--")
    ax.grid(True, which="both", lw=0.3)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mixed-minilm-384"))
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--only", default=None,
                    help="comma-separated systems (default: all; with --derived: spann)")
    ap.add_argument("--build-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N base vectors (smoke test)")
    ap.add_argument("--derived", type=int, default=0,
                    help="a derived set of N vectors: SPANN with --only spann, else the peers named in --only")
    ap.add_argument("--derived-queries", type=int, default=200,
                    help="queries on the derived set (its ground truth is brute force over all N rows)")
    ap.add_argument("--churn", action="store_true", help="run only the delete/re-insert/compact experiment")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (best of) per point")
    ap.add_argument("--lance-build", default="", help=argparse.SUPPRESS)  # child process of setup_lancedb
    a = ap.parse_args()
    if a.lance_build:
        _lance_build(a.lance_build, a.data, a.limit, a.build_threads)
        return
    base = np.load(os.path.join(a.data, "base.npy")).astype(np.float32)
    q = np.ascontiguousarray(np.load(os.path.join(a.data, "queries.npy"))[: a.queries], dtype=np.float32)
    gt = np.load(os.path.join(a.data, "gt_ids.npy"))[: a.queries, :10]
    if a.limit:
        # smoke runs: a prefix of the base with brute-force ground truth
        base = base[: a.limit]
        gt = np.argsort(-(q @ base.T), axis=1)[:, :10]
    out_json = os.path.join(a.out, "ann.json")
    results = {}
    if os.path.exists(out_json):
        with open(out_json) as f:
            results = json.load(f)
    results["_setup"] = {
        "n": int(base.shape[0]), "dim": int(base.shape[1]), "queries": int(len(q)),
        "machine": "2-core shared CPU", "cpus": os.cpu_count(), "build_threads": a.build_threads,
        "query_threads": 1, "f32_bytes": int(base.nbytes),
    }
    work = tempfile.mkdtemp(prefix="ann-bench-", dir=os.environ.get("BENCH_TMP", "/tmp"))
    try:
        if a.only is None:
            a.only = "spann" if a.derived else "spann,hnswlib,faiss,usearch,faiss-ondisk,lancedb,diskann"
        if a.derived and a.only != "spann":
            names = [v for v in a.only.split(",") if v]
            results[f"derived-{a.derived}-peers"] = derived_peers(base, q[:a.derived_queries], work, a.derived, names,
                                                                  a.build_threads, a.rounds, results)
            with open(out_json, "w") as f:
                json.dump(results, f, indent=1)
            png = os.path.join(a.out, f"ann-derived-{a.derived}.png")
            plot(results[f"derived-{a.derived}-peers"], png,
                 f"derived set: {a.derived:,} x 384 (real MiniLM rows + noisy copies), cosine, 2-core shared CPU")
            print(f"wrote {out_json} and {png}")
            return
        if a.derived:
            results[f"derived-{a.derived}"] = derived_run(base, q[:a.derived_queries], work, a.derived, a.build_threads)
            with open(out_json, "w") as f:
                json.dump(results, f, indent=1)
            return
        if a.churn:
            results["churn"] = churn(base, q, gt, work, a.build_threads)
            with open(out_json, "w") as f:
                json.dump(results, f, indent=1)
            return
        systems = []
        spann_path = None
        for name in a.only.split(","):
            if name == "spann":
                got, spann_path = setup_spann(base, work, a.build_threads)
                systems += got
            elif name == "hnswlib":
                systems += setup_hnswlib(base, work, a.build_threads, results)
            elif name == "faiss":
                systems += setup_faiss(base, work, a.build_threads, results)
            elif name == "usearch":
                systems += setup_usearch(base, work, a.build_threads, results)
            elif name == "faiss-ondisk":
                systems += setup_faiss_ondisk(base, work, a.build_threads, results)
            elif name == "lancedb":
                systems += setup_lancedb(base, work, a.build_threads, results, a.data, a.limit)
            elif name == "diskann":
                systems += setup_diskann(base, work, a.build_threads, results, a.data, len(q), a.limit)
            else:
                raise SystemExit(f"unknown system {name}")
        best = measure(systems, q, gt, a.rounds)
        for s in systems:
            results[s.name] = dict(s.info, points=[best[(s.name, label)] for label, _ in s.points])
            if s.name == "diskann-ssd":
                for p, (label, _) in zip(results[s.name]["points"], s.points):
                    L, bw = (int(v.split("=")[1]) for v in label.split(","))
                    p["device_bytes_per_query"] = s.extra["reads"][(L, bw)]
                s.extra["server"].close()
            elif s.name.startswith("faiss-IVF") and s.name.endswith("-ondisk"):
                ondisk_extras(results, s, q, gt)
            elif s.name == "lancedb-IVF_PQ":
                lance_extras(results, s, q)
        if spann_path:
            disk_extras(results, spann_path, q, gt)
        with open(out_json, "w") as f:
            json.dump(results, f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plot(results, os.path.join(a.out, "ann.png"))
    print(f"wrote {out_json} and {os.path.join(a.out, 'ann.png')}")


if __name__ == "__main__":
    main()

"""Speed of engramdb.Memory: add throughput and search latency at 10k and 100k memories.

    python benches/memory_speed.py [--sizes 10000,100000] [--queries 200] [--json out.json]

Texts are **synthetic sentences** generated here from templates ("<name> <verb> <object>
<place> <time>.", a seeded RNG over small word lists), so the keyword index sees
realistic short texts with a skewed vocabulary. Three measurements:

1. **add, end to end** (the bundled all-MiniLM-L6-v2 int8 embedder included):
   ``Memory.add(list_of_texts)`` in batches of ``--batch`` (default 256) over
   ``--e2e`` texts (default 2,000), and one text per call over 100 texts; texts/s.
2. **bulk ingest to 10k / 100k** with precomputed vectors: embedding 100k texts takes
   longer than this benchmark may run on a 2-core machine (~100 texts/s), so the store
   is filled with ``Memory.upsert(ids, texts, vectors=...)`` using real MiniLM vectors
   of the shared data set ``mixed-minilm-384`` (when present; random unit vectors
   otherwise) paired with the synthetic texts. This measures the store + WAL + BM25
   side of an add (texts/s), not the embedder. Reopen time (BM25 rebuild) is reported.
3. **search latency at each size**, query embedding included: ``--queries`` synthetic
   questions, ``Memory.search(q, k=10, user_id=...)`` in hybrid (the default), vector
   (with decay: the store's exact decayed recall; and without), and keyword mode, p50 /
   p99 in ms; the embedder's own share is timed separately. Nothing is reinforced.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

NAMES = "Caroline Melanie Alex Priya Jonas Mei Omar Sofia Liam Ava Noah Zoe Ivan Lena Ravi Emma".split()
VERBS = (
    "adopted visited painted cooked bought fixed read wrote planned joined left started finished "
    "photographed lost found borrowed sold designed repaired cleaned ordered booked watched"
).split()
OBJECTS = (
    "a puppy|the old bicycle|a watercolor of the harbor|a spicy lentil soup|a secondhand piano|"
    "the leaking faucet|a novel about sailors|a letter to her sister|a trip to Lisbon|a pottery class|"
    "the chess club|a new job|a marathon|the garden shed|a birthday cake|a vintage camera|"
    "a hiking map|the support group|a yoga course|a telescope|a quilt|the community garden|"
    "a guitar lesson|a recipe for dumplings|the kitchen shelves|a children's book"
).split("|")
PLACES = (
    "in Berlin|at the lake house|downtown|at the farmers market|near the river|at work|"
    "in the mountains|at the library|with friends|at home|in Kyoto|at the beach|online|"
    "at the community center|in the park"
).split("|")
TIMES = (
    "last week|yesterday|on Sunday|in May|over the holidays|this morning|two years ago|"
    "after the storm|before the wedding|on her birthday|during lunch|at night"
).split("|")
QUESTIONS = [
    "What did {n} {v}?",
    "When did {n} {v} {o}?",
    "Where did someone {v} {o}?",
    "Who {v} {o} {p}?",
    "Tell me about {o}",
]


def sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    picks = [rng.integers(0, len(x), n) for x in (NAMES, VERBS, OBJECTS, PLACES, TIMES)]
    # a Zipf-ish skew on objects, like real memories (a few topics recur a lot)
    zipf = np.minimum(rng.zipf(1.3, n) - 1, len(OBJECTS) - 1)
    return [
        f"{NAMES[a]} {VERBS[b]} {OBJECTS[z]} {PLACES[d]} {TIMES[e]}."
        for a, b, z, d, e in zip(picks[0], picks[1], zipf, picks[3], picks[4])
    ]


def questions(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = QUESTIONS[rng.integers(len(QUESTIONS))]
        out.append(
            t.format(
                n=NAMES[rng.integers(len(NAMES))],
                v=VERBS[rng.integers(len(VERBS))],
                o=OBJECTS[rng.integers(len(OBJECTS))],
                p=PLACES[rng.integers(len(PLACES))],
            )
        )
    return out


def pct(xs: list[float], p: float) -> float:
    return round(float(np.percentile(np.asarray(xs) * 1000.0, p)), 2)


def shared_vectors() -> Any:
    here = Path(__file__).resolve().parents[1]
    p = here.parent / "shared" / "data" / "mixed-minilm-384" / "base.npy"
    if p.exists():
        return np.load(p, mmap_mode="r"), "mixed-minilm-384 (real MiniLM vectors)"
    return None, "random unit vectors"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--e2e", type=int, default=2000, help="texts for the end-to-end add measurement")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--folder", default=None)
    args = ap.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))

    import engramdb
    from engramdb.embedders import default_embedder
    from engramdb.memory import Memory

    emb = default_embedder()
    emb(["warm up the session"])
    res: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "engramdb": engramdb.__version__,
        "embedder": emb.model_id,
    }

    # 1. end-to-end add with the real embedder
    root = Path(args.folder or tempfile.mkdtemp(prefix="memspeed-"))
    texts = sentences(args.e2e, seed=1)
    m = Memory(root / "e2e")
    t0 = time.perf_counter()
    for s in range(0, len(texts), args.batch):
        m.add(texts[s : s + args.batch], user_id="u")
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    for t in texts[:100]:
        m.add(t, user_id="u1")
    dt1 = time.perf_counter() - t1
    t2 = time.perf_counter()
    for s in range(0, len(texts), args.batch):
        emb(texts[s : s + args.batch])
    dte = time.perf_counter() - t2
    m.close()
    res["add_e2e"] = {
        "texts": len(texts),
        "batch": args.batch,
        "batched_texts_per_s": round(len(texts) / dt, 1),
        "single_texts_per_s": round(100 / dt1, 1),
        "embedder_alone_texts_per_s": round(len(texts) / dte, 1),
    }
    print(json.dumps(res["add_e2e"]), flush=True)

    # 2 + 3. bulk ingest and search latency at each size
    base, source = shared_vectors()
    res["vectors"] = source
    rng = np.random.default_rng(3)
    m = Memory(root / "bulk")
    qs = questions(args.queries, seed=2)
    have = 0
    res["sizes"] = {}
    all_texts = sentences(max(sizes), seed=4)
    for size in sizes:
        t0 = time.perf_counter()
        chunk = 2048
        for s in range(have, size, chunk):
            e = min(size, s + chunk)
            if base is not None:
                vecs = np.asarray(base[s:e], dtype=np.float32)
            else:
                vecs = rng.standard_normal((e - s, 384)).astype(np.float32)
            m.upsert(list(range(s, e)), all_texts[s:e], vectors=vecs, user_id="u")
        ingest = time.perf_counter() - t0
        n_new = size - have
        have = size
        m.store.flush()
        m.close()
        t0 = time.perf_counter()
        m = Memory(root / "bulk")
        reopen = time.perf_counter() - t0
        row: dict[str, Any] = {
            "bulk_ingest_texts_per_s": round(n_new / ingest, 1),
            "reopen_s": round(reopen, 2),
        }
        # embedding share of a query
        lat = []
        for q in qs:
            t = time.perf_counter()
            emb([q])
            lat.append(time.perf_counter() - t)
        row["query_embedding_ms"] = {"p50": pct(lat, 50), "p99": pct(lat, 99)}
        for name, kw in (
            ("hybrid", dict(mode="hybrid")),
            ("vector", dict(mode="vector")),
            ("vector_nodecay", dict(mode="vector", decay=False)),
            ("keyword", dict(mode="keyword")),
        ):
            lat = []
            for q in qs:
                t = time.perf_counter()
                m.search(q, k=10, user_id="u", **kw)
                lat.append(time.perf_counter() - t)
            row[f"search_{name}_ms"] = {"p50": pct(lat, 50), "p99": pct(lat, 99)}
        res["sizes"][str(size)] = row
        print(size, json.dumps(row), flush=True)
    m.close()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""LSH: recall and speed on real MiniLM vectors, and near-duplicate detection.

Part 1, ../shared/data/mixed-minilm-384 (200k x 384): engramdb's LshIndex at
several (tables, bits) settings against exact search (engramdb Store) and,
when available, the SPANN index, all on one thread, one query at a time:
recall@10 against the shared ground truth, queries/s, and the candidates LSH
scored per query.

Part 2, benches/data/paraphrase_pairs.jsonl (40 pairs written for this
bench: 20 paraphrases, 20 topically close non-paraphrases): each pair's first
text goes into a store; its second is added with ``dedupe=t``. A pair is
flagged a duplicate when the add returns the first text's id. Precision and
recall of that flag per threshold, with the bundled embedder.

    python benches/lsh.py [--n 200000] [--queries 300] [--out benches/out/lsh.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import engramdb

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "mixed-minilm-384"


def recall_at(got: np.ndarray, gt: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(got.astype(np.int64), gt)]))


def ann_part(n: int, nq: int, k: int) -> list[dict]:
    base = np.load(DATA / "base.npy")[:n].astype(np.float32)
    queries = np.load(DATA / "queries.npy")[:nq]
    if n == 200_000:
        gt = np.load(DATA / "gt_ids.npy")[:nq, :k]
    else:
        gt = np.argsort(-(queries @ base.T), axis=1)[:, :k]
    engramdb.set_num_threads(1)
    rows = []

    def run(name: str, search, extra=None) -> None:
        t0 = time.perf_counter()
        got = np.stack([search(q) for q in queries])
        dt = time.perf_counter() - t0
        row = {"index": name, "recall@10": recall_at(got, gt, k), "qps": nq / dt, **(extra() if extra else {})}
        rows.append(row)
        print(json.dumps(row))

    with tempfile.TemporaryDirectory() as tmp:
        with engramdb.Store(Path(tmp) / "exact", dim=base.shape[1], metric="ip", sync=False) as s:
            s.add(base)
            run("exact (engramdb Store)", lambda q: s.search(q, k=k)[0])
        for tables, bits in ((8, 16), (16, 14), (32, 12), (64, 10)):
            idx = engramdb.LshIndex(base.shape[1], tables=tables, bits=bits, seed=1)
            t0 = time.perf_counter()
            idx.add(base)
            build = time.perf_counter() - t0
            cands = []

            def search(q, idx=idx, cands=cands):
                ids = idx.search(q, k=k)[0]
                cands.append(idx.last_candidates)
                return ids

            run(f"LSH tables={tables} bits={bits}", search,
                lambda cands=cands, build=build: {"candidates/query": float(np.mean(cands)), "build_s": build})
        spann = getattr(engramdb, "SpannIndex", None)
        if spann is not None:
            try:
                idx = spann.build(base, Path(tmp) / "spann", metric="cosine", progress=False)
                run("SPANN (memory, defaults)", lambda q: idx.search(q, k=k)[0])
            except Exception as e:  # report, don't hide, a failure of the peer
                print(f"SPANN skipped: {type(e).__name__}: {e}")
    return rows


def dedupe_part() -> list[dict]:
    pairs = [json.loads(line) for line in (HERE / "data" / "paraphrase_pairs.jsonl").read_text().splitlines() if line]
    embed = engramdb.embedders.default_embedder()
    a = embed([p["a"] for p in pairs])
    b = embed([p["b"] for p in pairs])
    truth = np.array([p["duplicate"] for p in pairs])
    rows = []
    cos = np.sum(a * b, axis=1)
    for t in (0.80, 0.85, 0.90, 0.95):
        flagged = []
        for i in range(len(pairs)):
            with tempfile.TemporaryDirectory() as tmp, engramdb.Store(Path(tmp) / "s", dim=a.shape[1]) as s:
                [first] = s.add(a[i])
                [second] = s.add(b[i], dedupe=t)
                flagged.append(second == first)
        flagged = np.array(flagged)
        tp = int((flagged & truth).sum())
        precision = tp / max(1, int(flagged.sum()))
        recall = tp / int(truth.sum())
        exact = cos >= t  # what an exact scan at the same threshold would flag
        row = {
            "threshold": t,
            "precision": precision,
            "recall": recall,
            "flagged": int(flagged.sum()),
            "exact_recall": int((exact & truth).sum()) / int(truth.sum()),
            "lsh_missed_vs_exact": int((exact & ~flagged).sum()),
        }
        rows.append(row)
        print(json.dumps(row))
    print(f"cosine of paraphrases: min {cos[truth].min():.3f} mean {cos[truth].mean():.3f}; "
          f"of non-paraphrases: max {cos[~truth].max():.3f} mean {cos[~truth].mean():.3f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--skip-ann", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = {"ann": [] if args.skip_ann else ann_part(args.n, args.queries, args.k), "dedupe": dedupe_part()}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

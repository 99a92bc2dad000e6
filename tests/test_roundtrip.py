"""100k vectors with texts and metadata survive close and reopen."""

from __future__ import annotations

import numpy as np

from engramdb import Store


def test_100k_round_trip(tmp_path, rng):
    n, d = 100_000, 384
    x = rng.standard_normal((n, d)).astype(np.float32)
    texts = [f"memory number {i} \N{BRAIN}" for i in range(n)]
    meta = [{"i": i, "even": i % 2 == 0, "tags": [i % 7]} for i in range(n)]
    path = tmp_path / "s"
    with Store(path, dim=d) as s:
        for lo in range(0, n, 25_000):  # a few batches, one WAL frame group each
            s.add(x[lo : lo + 25_000], texts=texts[lo : lo + 25_000], metadata=meta[lo : lo + 25_000])
    probes = rng.choice(n, 1000, replace=False)
    for flush in (False, True):
        with Store(path) as s:
            assert len(s) == n
            ids, scores = s.search(x[probes], k=2, exact=True)  # SPANN past 100k: tests/test_store_ann.py
            assert (ids[:, 0] == probes).all(), "each probe finds itself at rank 1"
            assert (scores[:, 0] > scores[:, 1]).all()
            for p in probes[:200]:
                r = s.get(int(p))
                assert r.text == texts[p] and r.metadata == meta[p]
            if not flush:
                s.flush()  # second pass reads the segment instead of the log
                assert s.info()["segment_bytes"] > n * d * 4

"""The Store switches to the SPANN index above ann_threshold and stays exact below it."""

from __future__ import annotations

import numpy as np

import engramdb
from engramdb import Store


def recall(got, want, k=10):
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(got, want)]))


def test_switches_to_spann_on_real_embeddings(tmp_path, minilm):
    base, queries, _ = minilm
    x, q = base[:20_000], queries[:200]
    with Store(tmp_path / "s", dim=384, ann_threshold=15_000, sync=False) as s:
        s.add(x[:10_000], metadata=[{"half": i % 2} for i in range(10_000)])
        assert s.info()["index"] == "exact"
        s.add(x[10_000:], metadata=[{"half": i % 2} for i in range(10_000, 20_000)])
        assert s.info()["index"] == "spann-pending"
        exact, _ = s.search(q, k=10, exact=True)
        approx, _ = s.search(q, k=10)
        assert s.info()["index"] == "spann"
        r = recall(approx, exact)
        assert 0.9 <= r < 1.0 + 1e-9, r
        # filtered searches stay exact even above the threshold
        f_ids, _ = s.search(q[:20], k=10, filter={"half": 1})
        sims = q[:20] @ x.T
        sims[:, 0::2] = -np.inf
        assert (f_ids == np.argsort(-sims, axis=1)[:, :10]).all()
        # writes keep the approximate index current
        s.delete(list(range(0, 20_000, 2)))
        ids, _ = s.search(q, k=10)
        assert not (ids % 2 == 0).any(), "deleted ids never come back"
        new = s.add(q[:50] * 1.0)
        ids, _ = s.search(q[:50], k=1)
        assert (ids[:, 0] == new).mean() >= 0.95


def test_threshold_none_keeps_every_search_exact(tmp_path, rng):
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    with Store(tmp_path / "s", dim=16, ann_threshold=None) as s:
        s.add(x)
        s.search(x[:5], k=3)
        assert s.info()["index"] == "exact"
    with Store(tmp_path / "s", ann_threshold=1000) as s:
        ids, _ = s.search(x[:50], k=1)
        assert s.info()["index"] == "spann"
        assert (ids[:, 0] == np.arange(50)).mean() >= 0.9
        hits = s.recall(x[0], k=3, decay=False)
        assert hits[0].id == 0, "recall is exact at any size"


def test_engramdb_exports():
    assert engramdb.SpannIndex is not None and engramdb.Memory is not None

"""The Store API: shapes, metrics, ids, texts, metadata, filters, upsert, delete."""

from __future__ import annotations

import numpy as np
import pytest

import engramdb
from engramdb import MISSING_ID, Store


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_add_search_shapes_and_order(tmp_path, rng):
    x = unit(rng, 500, 32)
    with Store(tmp_path / "s", dim=32) as s:
        ids = s.add(x)
        assert ids.dtype == np.uint64 and ids.tolist() == list(range(500))
        assert len(s) == 500
        one_ids, one_scores = s.search(x[7], k=5)
        assert one_ids.shape == (5,) and one_scores.shape == (5,)
        assert one_ids[0] == 7 and one_scores[0] == pytest.approx(1.0, abs=1e-5)
        assert np.all(np.diff(one_scores) <= 1e-6), "cosine scores descend"
        b_ids, b_scores = s.search(x[:64], k=10)
        assert b_ids.shape == (64, 10) and b_scores.shape == (64, 10)
        want = np.argsort(-(x[:64] @ x.T), axis=1, kind="stable")[:, :10]
        assert (b_ids[:, 0] == np.arange(64)).all()
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(b_ids, want)])
        assert overlap >= 0.99


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_metrics_match_numpy(tmp_path, rng, metric):
    x = rng.standard_normal((300, 16)).astype(np.float32)
    q = rng.standard_normal((8, 16)).astype(np.float32)
    with Store(tmp_path / metric, dim=16, metric=metric) as s:
        s.add(x)
        ids, scores = s.search(q, k=5)
    if metric == "l2":
        d = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        want = np.argsort(d, axis=1)[:, :5]
        np.testing.assert_allclose(scores, np.take_along_axis(d, want, 1), rtol=1e-4, atol=1e-4)
        assert np.all(np.diff(scores, axis=1) >= -1e-5), "l2 returns squared distances, ascending"
    else:
        xn = x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x
        qn = q / np.linalg.norm(q, axis=1, keepdims=True) if metric == "cosine" else q
        sims = qn @ xn.T
        want = np.argsort(-sims, axis=1)[:, :5]
        np.testing.assert_allclose(scores, np.take_along_axis(sims, want, 1), rtol=1e-4, atol=1e-4)
    assert (ids == want).mean() > 0.97


def test_texts_metadata_get_and_upsert(tmp_path, rng):
    x = unit(rng, 3, 8)
    with Store(tmp_path / "s", dim=8) as s:
        ids = s.add(x, ids=[10, 20, 30], texts=["a", None, "c"], metadata=[{"k": 1}, None, {"k": [1, "x"]}])
        assert ids.tolist() == [10, 20, 30]
        r = s.get(10)
        assert r.text == "a" and r.metadata == {"k": 1}
        np.testing.assert_allclose(r.vector, x[0], atol=1e-6)
        assert s.get(20).text is None and s.get(20).metadata is None
        created = s.get(30).created_at
        s.upsert(x[0], ids=[30], texts="replaced", metadata={"k": 2})
        r = s.get(30)
        assert r.text == "replaced" and r.metadata == {"k": 2} and r.created_at == created
        assert s.search(x[0], k=2)[0].tolist() == [10, 30]
        s.upsert(x[1], ids=[40])
        assert len(s) == 4 and 40 in s
        new = s.add(x[2])
        assert new[0] == 41, "assigned ids continue after the largest seen"


def test_delete_and_len(tmp_path, rng):
    x = unit(rng, 100, 8)
    with Store(tmp_path / "s", dim=8) as s:
        s.add(x)
        assert s.delete([5, 6, 6]) == 2
        assert s.delete(7) == 1
        assert len(s) == 97 and 5 not in s
        ids, _ = s.search(x[5], k=97)
        assert 5 not in ids.tolist() and 6 not in ids.tolist()
        with pytest.raises(engramdb.NotFoundError):
            s.delete([8, 5])
        assert 8 in s, "a rejected delete deletes nothing"


def test_k_larger_than_store_and_filter_padding(tmp_path, rng):
    x = unit(rng, 5, 4)
    with Store(tmp_path / "s", dim=4) as s:
        s.add(x, metadata=[{"even": i % 2 == 0} for i in range(5)])
        ids, scores = s.search(x[0], k=50)
        assert ids.shape == (5,)
        ids, scores = s.search(x[0], k=5, filter={"even": True})
        assert sorted(ids[:3].tolist()) == [0, 2, 4]
        assert (ids[3:] == MISSING_ID).all() and np.isnan(scores[3:]).all()


def test_filter_matches_python_reference(tmp_path, rng):
    n = 2000
    x = unit(rng, n, 16)
    meta = [{"color": ["red", "green", "blue"][i % 3], "n": int(i % 17), "tags": ["t%d" % (i % 5)]} for i in range(n)]
    filters = [
        ({"color": "red"}, lambda m: m["color"] == "red"),
        ({"n": {"gte": 3, "lt": 9}}, lambda m: 3 <= m["n"] < 9),
        ({"or": [{"color": "blue"}, {"n": {"in": [1, 2]}}]}, lambda m: m["color"] == "blue" or m["n"] in (1, 2)),
        ({"not": {"tags": {"contains": "t1"}}}, lambda m: "t1" not in m["tags"]),
        ({"color": {"nin": ["red", "green"]}, "n": {"ne": 0}}, lambda m: m["color"] == "blue" and m["n"] != 0),
    ]
    q = unit(rng, 4, 16)
    with Store(tmp_path / "s", dim=16) as s:
        s.add(x, metadata=meta)
        for f, pred in filters:
            ids, _ = s.search(q, k=10, filter=f)
            mask = np.array([pred(m) for m in meta])
            sims = q @ x.T
            sims[:, ~mask] = -np.inf
            want = np.argsort(-sims, axis=1)[:, :10]
            assert (ids == want).all(), f


def test_import_needs_no_torch():
    import subprocess
    import sys

    code = "import sys, engramdb, engramdb.cli; assert 'torch' not in sys.modules, 'engramdb imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_concurrent_writes_and_searches_do_not_deadlock(tmp_path):
    import threading

    rng = np.random.default_rng(0)
    s = Store(tmp_path / "s", dim=64)
    s.add(rng.standard_normal((2000, 64)), user_id="u")
    stop = threading.Event()

    def writer():
        for _ in range(100):
            s.add(rng.standard_normal((4, 64)), user_id="u", auto_link=True)
        stop.set()

    def reader():
        q = np.random.default_rng(1).standard_normal(64)
        while not stop.is_set():
            s.search(q, k=10, user_id="u")

    ts = [threading.Thread(target=writer, daemon=True)] + [threading.Thread(target=reader, daemon=True) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in ts), "deadlock: threads still blocked after 120 s"
    assert len(s) == 2400
    s.close()

"""SpannIndex from Python: recall on the shared MiniLM data, memory and disk
modes agreeing, reopen, 1-D/2-D queries, errors, updates and compaction."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import engramdb.errors as errors
from engramdb.spann import SpannIndex, parse_bytes

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mixed-minilm-384")
if not os.path.isdir(DATA):
    DATA = "/work/shared/data/mixed-minilm-384"


def _recall(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth)]))


@pytest.fixture(scope="module")
def minilm50k():
    if not os.path.exists(os.path.join(DATA, "base.npy")):
        pytest.skip("shared data set not present")
    base = np.load(os.path.join(DATA, "base.npy"), mmap_mode="r")[:50_000].astype(np.float32)
    q = np.load(os.path.join(DATA, "queries.npy"))[:300]
    sims = q @ base.T
    truth = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    return base, q, truth


@pytest.fixture(scope="module")
def built(minilm50k, tmp_path_factory):
    base, q, truth = minilm50k
    path = tmp_path_factory.mktemp("spann") / "idx"
    seen = []
    idx = SpannIndex.build(base, path, metric="cosine", progress=lambda s, d, t: seen.append((s, d, t)))
    assert {s for s, _, _ in seen} >= {"heads", "assign"}
    return idx, path


def test_recall_at_default_params_and_modes_agree(minilm50k, built):
    base, q, truth = minilm50k
    idx, path = built
    ids, scores = idx.search(q, k=10)
    assert ids.shape == (len(q), 10) and scores.dtype == np.float32
    r = _recall(ids, truth)
    assert r >= 0.95, f"recall@10 {r:.4f}"
    assert np.all(np.diff(scores, axis=1) <= 1e-6), "scores best first"
    st = idx.stats()
    assert st["mode"] == "disk" and st["last_postings_read"] > 0 and st["last_bytes_read"] > 0
    assert st["heads"] > 0.02 * len(base) and 1.0 <= st["replicas"] <= 8.0
    assert st["ram_bytes"] < base.nbytes * 0.2, st
    # `idx` is the directory's writer: more handles open read-only
    mem = SpannIndex.open(path, mode="memory", read_only=True)
    mids, mscores = mem.search(q, k=10)
    np.testing.assert_array_equal(mids, ids)
    np.testing.assert_array_equal(mscores, scores)
    assert mem.stats()["last_bytes_read"] == 0
    again = SpannIndex.open(path, read_only=True)
    np.testing.assert_array_equal(again.search(q, k=10)[0], ids)


def test_single_query_and_knobs(minilm50k, built):
    base, q, truth = minilm50k
    idx, _ = built
    i1, s1 = idx.search(q[0], k=5)
    assert i1.shape == (5,) and s1.shape == (5,)
    i2, _ = idx.search(q[:1], k=5)
    np.testing.assert_array_equal(i1, i2[0])
    low, _ = idx.search(q, k=10, nprobe=4, coarse_probe=4)
    assert idx.stats()["last_postings_read"] <= 4 * len(q)
    assert _recall(low, truth) < _recall(idx.search(q, k=10)[0], truth)


def test_wrong_dimension_fails_before_io(built):
    idx, _ = built
    with pytest.raises(errors.DimensionMismatchError):
        idx.search(np.ones(17, dtype=np.float32))
    with pytest.raises(ValueError):
        idx.search(np.ones((2, 3, 384)))


def test_flipped_byte_raises_corruption(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    SpannIndex.build(x, tmp_path / "i", metric="l2", progress=False)
    pfile = next(p for p in (tmp_path / "i").iterdir() if p.name.startswith("postings-"))
    b = bytearray(pfile.read_bytes())
    for page in range(1, len(b) // 4096):
        b[page * 4096 + 100] ^= 0x01
    pfile.write_bytes(bytes(b))
    idx = SpannIndex.open(tmp_path / "i")
    with pytest.raises(errors.CorruptionError):
        idx.search(x[:5])
    with pytest.raises(errors.CorruptionError):
        idx.verify()
    # a flipped byte in a full-precision vector record (read at rerank)
    SpannIndex.build(x, tmp_path / "v", metric="l2", progress=False)
    vfile = next(p for p in (tmp_path / "v").iterdir() if p.name.startswith("vectors-"))
    b = bytearray(vfile.read_bytes())
    for off in range(4096 + 7, len(b), 16 * 4 + 4):
        b[off] ^= 0x20
    vfile.write_bytes(bytes(b))
    with pytest.raises(errors.CorruptionError):
        SpannIndex.open(tmp_path / "v").search(x[:5])
    with pytest.raises(errors.CorruptionError):
        SpannIndex.open(tmp_path / "v", mode="memory")
    # a damaged metadata file
    meta = tmp_path / "v" / "spann.meta"
    m = bytearray(meta.read_bytes())
    m[len(m) // 2] ^= 0xFF
    meta.write_bytes(bytes(m))
    with pytest.raises(errors.CorruptionError):
        SpannIndex.open(tmp_path / "v")


def test_updates_delete_reinsert_compact(tmp_path):
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((50, 24))
    x = (centers[rng.integers(0, 50, 6000)] + 0.3 * rng.standard_normal((6000, 24))).astype(np.float32)
    q = x[:100] + 0.05 * rng.standard_normal((100, 24)).astype(np.float32)
    ids = np.arange(6000, dtype=np.uint64) * 10
    idx = SpannIndex.build(x, tmp_path / "u", metric="l2", ids=ids, progress=False)
    fresh_disk = idx.stats()["disk_bytes"]
    exact = np.argsort(((q[:, None, :] - x[None]) ** 2).sum(-1), axis=1)[:, :10] * 10
    fresh = _recall(idx.search(q)[0], exact)
    gone = ids[::2]
    assert idx.delete(gone) == len(gone)
    assert idx.delete(gone[:3]) == 0
    found = idx.search(q)[0]
    assert not np.isin(found, gone).any()
    idx.add(x[::2], gone)
    with pytest.raises(errors.DuplicateIdError):
        idx.add(x[:1], gone[:1])
    idx.flush()
    assert len(idx) == 6000
    churned = _recall(idx.search(q)[0], exact)
    rep = idx.compact()
    assert rep["rows_dropped"] == len(gone)
    st = idx.stats()
    assert st["disk_bytes"] <= 1.5 * fresh_disk, (st, fresh_disk)
    compacted = _recall(idx.search(q)[0], exact)
    assert churned >= fresh - 0.02 and compacted >= fresh - 0.02, (fresh, churned, compacted)
    reopened = SpannIndex.open(tmp_path / "u", mode="memory", read_only=True)
    np.testing.assert_array_equal(reopened.search(q)[0], idx.search(q)[0])


def test_disk_writer_reads_heads_back_on_first_write(tmp_path):
    """A disk-mode writer opened on a flushed index holds no head vectors
    (the RAM of a read-only handle) until it writes; then it reads them back,
    and its adds land where a memory-mode writer's would."""
    rng = np.random.default_rng(5)
    centers = rng.standard_normal((40, 32))
    x = (centers[rng.integers(0, 40, 5000)] + 0.3 * rng.standard_normal((5000, 32))).astype(np.float32)
    more = (centers[rng.integers(0, 40, 1500)] + 0.3 * rng.standard_normal((1500, 32))).astype(np.float32)
    q = x[:50] + 0.05 * rng.standard_normal((50, 32)).astype(np.float32)
    SpannIndex.build(x, tmp_path / "a", metric="l2", progress=False).close()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    ro = SpannIndex.open(tmp_path / "a", mode="disk", read_only=True)
    ro_ram = ro.stats()["ram_bytes"]
    ro.close()
    w = SpannIndex.open(tmp_path / "a", mode="disk")
    assert w.stats()["ram_bytes"] == ro_ram
    keep = SpannIndex.open(tmp_path / "b", mode="memory")
    new_ids = np.arange(10_000, 11_500, dtype=np.uint64)
    for idx in (w, keep):
        idx.add(more, new_ids)
        idx.flush()
    heads_bytes = w.stats()["heads"] * 32 * 4
    assert w.stats()["ram_bytes"] >= ro_ram + heads_bytes
    assert w.stats()["heads"] == keep.stats()["heads"]
    np.testing.assert_array_equal(w.search(q)[0], keep.search(q)[0])
    w.close()
    keep.close()
    a = SpannIndex.open(tmp_path / "a", mode="memory", read_only=True)
    b = SpannIndex.open(tmp_path / "b", mode="memory", read_only=True)
    np.testing.assert_array_equal(a.search(more[:50])[0], b.search(more[:50])[0])
    assert a.verify()["postings"] > 0


def test_build_arguments(tmp_path):
    x = np.random.default_rng(2).standard_normal((500, 8)).astype(np.float32)
    with pytest.raises(ValueError):
        SpannIndex.build(x[0], tmp_path / "a")
    with pytest.raises(errors.InvalidArgumentError):
        SpannIndex.build(x, tmp_path / "b", progress=False, no_such_param=3)
    with pytest.raises(errors.InvalidArgumentError):
        SpannIndex.build(x, tmp_path / "c", metric="hamming", progress=False)
    with pytest.raises(errors.DuplicateIdError):
        SpannIndex.build(x, tmp_path / "d", ids=np.zeros(500, dtype=np.int64), progress=False)
    big = np.random.default_rng(3).standard_normal((5000, 8)).astype(np.float32)
    small = SpannIndex.build(big, tmp_path / "e", progress=False, memory_budget=230_000, mode="memory")
    assert small.params()["head_ratio"] < 0.03 and small.stats()["heads"] < 200 and len(small) == 5000
    with pytest.raises(errors.InvalidArgumentError):
        SpannIndex.build(big, tmp_path / "f", progress=False, memory_budget="100KB")
    # search parameters named at build time are what a query gets when it
    # names none; a build that names none gets the defaults for its size
    # (the Rust test default_search_scales_with_heads covers the scaling)
    named = SpannIndex.build(x, tmp_path / "g", progress=False, nprobe=1, coarse_probe=1, mode="memory")
    assert (named.params()["nprobe"], named.params()["coarse_probe"]) == (1, 1)
    assert (small.params()["nprobe"], small.params()["coarse_probe"]) == (48, 32)
    q = x[:20]
    np.testing.assert_array_equal(named.search(q, k=5)[0], named.search(q, k=5, nprobe=1, coarse_probe=1)[0])
    assert not np.array_equal(named.search(q, k=5)[0], named.search(q, k=5, nprobe=48, coarse_probe=32)[0])
    assert parse_bytes("512MB") == 512 << 20 and parse_bytes(1000) == 1000
    with pytest.raises(ValueError):
        parse_bytes("lots")

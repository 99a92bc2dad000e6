"""`engramdb index build|query|info|verify|compact` through click's runner,
and the vector-file readers' errors on malformed input."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from engramdb._vecio import VectorFileError, read_ids, read_vectors
from engramdb.cli_index import index


def _data(n=4000, d=16, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((40, d))
    return (c[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, d))).astype(np.float32)


def _fvecs(path, x, comp="<f4"):
    n, d = x.shape
    rec = np.empty((n, 1 + d), dtype="<i4")
    rec[:, 0] = d
    rec[:, 1:] = x.astype(comp).view("<i4") if comp in ("<f4", "<i4") else 0
    if comp == "u1":
        with open(path, "wb") as f:
            for row in x.astype("u1"):
                f.write(np.int32(d).tobytes() + row.tobytes())
        return
    rec.tofile(path)


def test_build_query_info_verify_compact(tmp_path):
    x = _data()
    q = x[:50] + 0.01
    np.save(tmp_path / "v.npy", x.astype(np.float16))
    np.save(tmp_path / "q.npy", q)
    gt = np.argsort(-(q / np.linalg.norm(q, axis=1, keepdims=True)) @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T, axis=1)[:, :10]
    np.save(tmp_path / "gt.npy", gt.astype(np.int32))
    r = CliRunner()
    out = r.invoke(index, ["build", str(tmp_path / "v.npy"), "--out", str(tmp_path / "idx"), "--no-progress"])
    assert out.exit_code == 0, out.output
    assert "4000 vectors x 16" in out.output
    out = r.invoke(index, ["query", str(tmp_path / "idx"), str(tmp_path / "q.npy"), "-k", "10",
                           "--gt", str(tmp_path / "gt.npy"), "--out", str(tmp_path / "hits.npy")])
    assert out.exit_code == 0, out.output
    line = [s for s in out.output.splitlines() if s.startswith("recall@10")][0]
    assert float(line.split("=")[1]) >= 0.9, out.output
    hits = np.load(tmp_path / "hits.npy")
    assert hits.shape == (50, 10)
    assert np.load(tmp_path / "hits.scores.npy").shape == (50, 10)
    out = r.invoke(index, ["info", str(tmp_path / "idx")])
    assert out.exit_code == 0 and "heads" in out.output and "4000 live" in out.output, out.output
    out = r.invoke(index, ["info", "--json", str(tmp_path / "idx")])
    assert '"live": 4000' in out.output
    out = r.invoke(index, ["verify", str(tmp_path / "idx")])
    assert out.exit_code == 0 and out.output.startswith("ok:"), out.output
    out = r.invoke(index, ["compact", str(tmp_path / "idx")])
    assert out.exit_code == 0 and "compacted" in out.output, out.output
    # fvecs / bvecs inputs
    _fvecs(tmp_path / "v.fvecs", x)
    out = r.invoke(index, ["build", str(tmp_path / "v.fvecs"), "-o", str(tmp_path / "i2"), "--metric", "l2", "--no-progress"])
    assert out.exit_code == 0, out.output


def test_clear_errors_on_malformed_input(tmp_path):
    r = CliRunner()
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    out = r.invoke(index, ["build", str(tmp_path / "junk.npy"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert out.exit_code != 0 and "Error" in out.output and "junk.npy" in out.output
    assert "Traceback" not in out.output
    x = _data(100, 8)
    _fvecs(tmp_path / "t.fvecs", x)
    b = (tmp_path / "t.fvecs").read_bytes()
    (tmp_path / "t.fvecs").write_bytes(b[:-3])
    out = r.invoke(index, ["build", str(tmp_path / "t.fvecs"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert out.exit_code != 0 and "truncated" in out.output, out.output
    np.save(tmp_path / "one.npy", np.ones(5, dtype=np.float32))
    out = r.invoke(index, ["build", str(tmp_path / "one.npy"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert out.exit_code != 0 and "2-D" in out.output
    out = r.invoke(index, ["build", str(tmp_path / "v.csv"), "--out", str(tmp_path / "o")])
    assert out.exit_code != 0 and "no such file" in out.output
    out = r.invoke(index, ["info", str(tmp_path / "nothing")])
    assert out.exit_code != 0 and "Error" in out.output
    # a query file of the wrong dimension
    np.save(tmp_path / "v.npy", _data(2000, 8))
    assert r.invoke(index, ["build", str(tmp_path / "v.npy"), "-o", str(tmp_path / "i"), "--no-progress"]).exit_code == 0
    np.save(tmp_path / "q.npy", np.ones((3, 9), dtype=np.float32))
    out = r.invoke(index, ["query", str(tmp_path / "i"), str(tmp_path / "q.npy")])
    assert out.exit_code != 0 and "dimension 9" in out.output, out.output


def test_readers(tmp_path):
    x = _data(30, 4)
    _fvecs(tmp_path / "a.fvecs", x)
    np.testing.assert_array_equal(read_vectors(tmp_path / "a.fvecs"), x)
    _fvecs(tmp_path / "b.bvecs", np.arange(12).reshape(3, 4), comp="u1")
    np.testing.assert_array_equal(read_vectors(tmp_path / "b.bvecs"), np.arange(12, dtype=np.float32).reshape(3, 4))
    ids = np.arange(20, dtype=np.int32).reshape(2, 10)
    _fvecs(tmp_path / "g.ivecs", ids.view(np.float32))
    np.testing.assert_array_equal(read_ids(tmp_path / "g.ivecs"), ids)
    # inconsistent dimensions in a vecs file
    raw = bytearray((tmp_path / "a.fvecs").read_bytes())
    raw[20:24] = np.int32(3).tobytes()
    (tmp_path / "c.fvecs").write_bytes(bytes(raw))
    with pytest.raises(VectorFileError, match="record 1 declares dimension 3"):
        read_vectors(tmp_path / "c.fvecs")
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan]], dtype=np.float32))
    with pytest.raises(VectorFileError, match="vector 0"):
        read_vectors(tmp_path / "nan.npy")
    np.save(tmp_path / "s.npy", np.array([["a", "b"]]))
    with pytest.raises(VectorFileError, match="not numeric"):
        read_vectors(tmp_path / "s.npy")
    (tmp_path / "e.fvecs").write_bytes(b"")
    with pytest.raises(VectorFileError, match="empty"):
        read_vectors(tmp_path / "e.fvecs")

"""Bad input gets a named error and loses nothing already stored."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest

import engramdb
from engramdb import Store, errors


@pytest.fixture
def filled(tmp_path, rng):
    path = tmp_path / "s"
    x = rng.standard_normal((50, 8)).astype(np.float32)
    s = Store(path, dim=8)
    s.add(x, texts=[f"t{i}" for i in range(50)])
    yield s, x, path
    s.close()


def assert_intact(s, x):
    assert len(s) == len(x)
    ids, _ = s.search(x, k=1)
    assert (ids[:, 0] == np.arange(len(x))).all()


def test_error_hierarchy():
    for cls in (errors.DimensionMismatchError, errors.InvalidVectorError, errors.EmptyInputError, errors.DuplicateIdError):
        assert issubclass(cls, errors.EngramError) and issubclass(cls, ValueError)
    assert issubclass(errors.NotFoundError, KeyError)
    for cls in (errors.StoreLockedError, errors.CorruptionError, errors.FormatVersionError):
        assert issubclass(cls, errors.EngramError)


def test_wrong_dimension(filled, rng):
    s, x, _ = filled
    with pytest.raises(errors.DimensionMismatchError, match="expected 8, got 7"):
        s.add(rng.standard_normal((3, 7)))
    with pytest.raises(errors.DimensionMismatchError):
        s.search(np.ones(9))
    with pytest.raises(errors.DimensionMismatchError):
        s.add(np.ones((2, 2, 8)))
    assert_intact(s, x)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf(filled, bad):
    s, x, _ = filled
    v = np.ones((4, 8), dtype=np.float32)
    v[2, 3] = bad
    with pytest.raises(errors.InvalidVectorError, match="vector 2 component 3"):
        s.add(v)
    with pytest.raises(errors.InvalidVectorError):
        s.search(v[2])
    assert_intact(s, x)


def test_zero_vector_under_cosine(filled):
    s, x, _ = filled
    with pytest.raises(errors.InvalidVectorError, match="zero vector"):
        s.add(np.zeros(8))
    assert_intact(s, x)


def test_empty_batch(filled):
    s, x, _ = filled
    with pytest.raises(errors.EmptyInputError):
        s.add(np.zeros((0, 8)))
    with pytest.raises(errors.EmptyInputError):
        s.search(np.zeros((0, 8)))
    assert_intact(s, x)


def test_non_contiguous_and_other_dtypes_are_converted(filled, rng):
    s, x, _ = filled
    big = rng.standard_normal((10, 16))  # float64
    view = big[:, ::2]
    assert not view.flags.c_contiguous
    ids = s.add(view)
    for i, v in zip(ids, view):
        got = s.get(int(i)).vector
        np.testing.assert_allclose(got, v / np.linalg.norm(v), atol=1e-6)
    assert s.search(x[:, ::-1][:, ::-1], k=1)[0][:, 0].tolist() == list(range(50))
    with pytest.raises(errors.InvalidArgumentError):
        s.add([["a"] * 8])


def test_duplicate_ids(filled, rng):
    s, x, _ = filled
    with pytest.raises(errors.DuplicateIdError, match="duplicate id 3"):
        s.add(rng.standard_normal((2, 8)), ids=[100, 3])
    with pytest.raises(errors.DuplicateIdError):
        s.add(rng.standard_normal((2, 8)), ids=[200, 200])
    assert 100 not in s and 200 not in s
    assert_intact(s, x)


def test_unknown_id(filled):
    s, x, _ = filled
    with pytest.raises(errors.NotFoundError):
        s.get(12345)
    with pytest.raises(KeyError):
        s.delete([12345])
    assert_intact(s, x)


def test_bad_arguments(filled):
    s, x, _ = filled
    with pytest.raises(errors.InvalidArgumentError):
        s.search(x[0], k=0)
    with pytest.raises(errors.InvalidArgumentError, match="bad filter"):
        s.search(x[0], filter={"a": {"in": 3}})
    with pytest.raises(errors.InvalidArgumentError):
        s.add(x[:2], texts=["only one"])
    with pytest.raises(errors.InvalidArgumentError):
        s.add(x[:1], metadata=[["not", "a", "dict"]])
    with pytest.raises(errors.InvalidArgumentError):
        s.add(x[:1], ids=[-1])
    with pytest.raises(errors.InvalidArgumentError, match="metric"):
        Store(s.path + "-other", dim=4, metric="hamming")
    with pytest.raises(errors.InvalidArgumentError, match="pass dim"):
        Store(s.path + "-missing")
    assert_intact(s, x)


def test_second_writer_is_refused_in_process_and_across_processes(filled):
    s, x, path = filled
    with pytest.raises(errors.StoreLockedError):
        Store(path)
    code = (
        "import engramdb, sys\n"
        "try:\n    engramdb.Store(sys.argv[1])\n"
        "except engramdb.StoreLockedError:\n    sys.exit(42)\n"
    )
    assert subprocess.run([sys.executable, "-c", code, str(path)]).returncode == 42
    with Store(path, read_only=True) as r:
        assert len(r) == 50
        with pytest.raises(errors.ReadOnlyError):
            r.add(x[:1])
    assert_intact(s, x)


def test_reopen_with_other_dim_or_metric(filled):
    s, x, path = filled
    s.close()
    with pytest.raises(errors.DimensionMismatchError):
        Store(path, dim=9)
    with pytest.raises(errors.InvalidArgumentError):
        Store(path, metric="l2")
    with Store(path) as s2:
        assert_intact(s2, x)


def test_closed_store(filled):
    s, _, _ = filled
    s.close()
    s.close()
    with pytest.raises(errors.StoreClosedError):
        len(s)


def _wal(path):
    return sorted(path.glob("wal-*.log"))[-1]


def test_truncated_log_keeps_every_whole_record(tmp_path, rng):
    path = tmp_path / "s"
    x = rng.standard_normal((30, 8)).astype(np.float32)
    with Store(path, dim=8) as s:
        for i in range(30):
            s.add(x[i : i + 1], texts=[f"t{i}"])
    wal = _wal(path)
    full = wal.read_bytes()
    wal.write_bytes(full[:-7])  # tear the last frame
    info = engramdb.verify(path)
    assert info["count"] == 29 and info["torn_bytes"] > 0
    with Store(path) as s:
        assert len(s) == 29 and 29 not in s
        s.add(x[29:30], ids=[29])
    with Store(path) as s:
        assert len(s) == 30 and s.get(28).text == "t28"


def test_flipped_byte_in_segment_is_corruption(tmp_path, rng):
    path = tmp_path / "s"
    x = rng.standard_normal((40, 8)).astype(np.float32)
    with Store(path, dim=8) as s:
        s.add(x)
        s.flush()
    seg = next(path.glob("seg-*.dat"))
    good = seg.read_bytes()
    for offset in (5, 40, 200, len(good) // 2, len(good) - 3):
        b = bytearray(good)
        b[offset] ^= 0x20
        seg.write_bytes(bytes(b))
        with pytest.raises(errors.CorruptionError, match="seg-"):
            Store(path)
        with pytest.raises(errors.CorruptionError):
            engramdb.verify(path)
    seg.write_bytes(good)
    with Store(path) as s:
        assert_intact(s, x)


def test_flipped_byte_mid_log_is_corruption(tmp_path, rng):
    path = tmp_path / "s"
    with Store(path, dim=8) as s:
        for _ in range(5):
            s.add(rng.standard_normal((2, 8)))
    wal = _wal(path)
    b = bytearray(wal.read_bytes())
    b[60] ^= 0x01
    wal.write_bytes(bytes(b))
    with pytest.raises(errors.CorruptionError, match="wal-"):
        Store(path)


def test_newer_format_version_is_refused(tmp_path, rng):
    path = tmp_path / "s"
    with Store(path, dim=8) as s:
        s.add(rng.standard_normal((2, 8)))
    man = path / "MANIFEST"
    b = bytearray(man.read_bytes())
    b[8:10] = struct.pack("<H", 99)
    import zlib

    b[28:32] = struct.pack("<I", zlib.crc32(bytes(b[:28])))
    man.write_bytes(bytes(b))
    with pytest.raises(errors.FormatVersionError, match="99"):
        Store(path)


def test_not_a_store(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "MANIFEST").write_bytes(b"hello world" * 10)
    with pytest.raises(errors.CorruptionError, match="magic"):
        Store(tmp_path / "s")

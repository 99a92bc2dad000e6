"""Fuzzing the index CLI's input readers (``.npy``, ``.fvecs``, ``.bvecs``,
``.ivecs``) with hypothesis: valid files, then bit flips, truncations,
length-field lies, spliced and random bytes. Every input either reads as a
finite C-contiguous float32 (n, dim) array (ids: int64) or raises
:class:`VectorFileError`; never another exception, a hang or an allocation
beyond the file's size. Not coverage-guided (hypothesis explores the
mutation space, not branches); the seeds include the committed regressions
under ``rust/fuzz/corpus/vecio/``."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engramdb._vecio import VectorFileError, read_ids, read_vectors

CORPUS = Path(__file__).resolve().parents[1] / "rust" / "fuzz" / "corpus" / "vecio"
# ENGRAMDB_FUZZ_EXAMPLES raises the example count for a long run outside CI
SETTINGS = settings(max_examples=int(os.environ.get("ENGRAMDB_FUZZ_EXAMPLES", "250")), deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def npy_bytes(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, arr, allow_pickle=False)
    return b.getvalue()


def vecs_bytes(arr: np.ndarray, comp: str) -> bytes:
    out = bytearray()
    for row in arr:
        out += struct.pack("<i", len(row)) + np.asarray(row, dtype=comp).tobytes()
    return bytes(out)


SEEDS: list[tuple[str, bytes]] = [
    (".npy", npy_bytes(np.arange(12, dtype=np.float32).reshape(3, 4))),
    (".npy", npy_bytes(np.arange(6, dtype=np.int64).reshape(2, 3))),
    (".npy", npy_bytes(np.ones((2, 2), dtype=np.float16))),
    (".npy", npy_bytes(np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)))),
    (".fvecs", vecs_bytes(np.arange(8, dtype=np.float32).reshape(2, 4), "<f4")),
    (".bvecs", vecs_bytes(np.arange(6, dtype=np.uint8).reshape(3, 2), "u1")),
    (".ivecs", vecs_bytes(np.arange(6, dtype=np.int32).reshape(2, 3), "<i4")),
]
if CORPUS.is_dir():
    SEEDS += [(p.suffix, p.read_bytes()) for p in sorted(CORPUS.iterdir()) if p.suffix]

INTERESTING = [0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1_000_000, 1_000_001]


@st.composite
def mutated(draw):
    ext, data = draw(st.sampled_from(SEEDS))
    ext = draw(st.sampled_from([ext, ext, ext, ".npy", ".fvecs", ".bvecs", ".ivecs"]))
    b = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.integers(0, 7))
        n = len(b)
        pos = draw(st.integers(0, max(n - 1, 0)))
        if op == 0 and n:
            b[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == 1 and n:
            b[pos] = draw(st.integers(0, 255))
        elif op == 2:
            at = pos // 4 * 4
            if at + 4 <= n:
                b[at:at + 4] = struct.pack("<I", draw(st.sampled_from(INTERESTING)))
        elif op == 3:
            del b[pos:]
        elif op == 4:
            b += draw(st.binary(max_size=64))
        elif op == 5 and n:
            del b[pos:pos + draw(st.integers(1, 32))]
        elif op == 6:
            # rewrite the .npy header dict: shapes, dtypes, order
            text = bytes(b[:128]).decode("latin-1")
            for old, new in [("(3, 4)", draw(st.sampled_from(["(4, 3)", "(12,)", "(3, 4, 1)", "(2**40, 4)",
                                                              "(99999999999, 99999999999)", "()", "(-1, 4)"]))),
                             ("'<f4'", draw(st.sampled_from(["'<f8'", "'|O'", "'<c8'", "'|b1'", "'V16'", "'<U2'",
                                                             "'>f4'", "[('a', '<f4')]"]))),
                             ("False", "True")]:
                if draw(st.booleans()):
                    text = text.replace(old, new)
            b[:128] = text.encode("latin-1")[:128]
        elif op == 7:
            other = draw(st.sampled_from(SEEDS))[1]
            cut = draw(st.integers(0, len(other)))
            b = b[:pos] + bytearray(other[cut:])
    return ext, bytes(b)


def check_read(path: Path, ext: str) -> None:
    size = path.stat().st_size
    tracemalloc.start()
    try:
        if ext == ".ivecs":
            arr = read_ids(path)
            assert arr.dtype == np.int64 and arr.ndim == 2
        else:
            arr = read_vectors(path)
            assert arr.dtype == np.float32 and arr.ndim == 2 and arr.flags.c_contiguous
            assert arr.shape[0] > 0 and arr.shape[1] > 0 and np.isfinite(arr).all()
    except VectorFileError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # a float32 copy of what the file holds, at most (int8 -> float32 is 4x)
    assert peak <= 16 * size + (1 << 20), f"peak allocation {peak} for a {size}-byte file"


@SETTINGS
@given(mutated())
def test_vector_readers_never_fail_untyped(tmp_path_factory, case):
    ext, data = case
    p = tmp_path_factory.mktemp("v") / f"x{ext}"
    p.write_bytes(data)
    check_read(p, ext)


@pytest.mark.parametrize("ext", [".npy", ".fvecs", ".bvecs", ".ivecs"])
def test_every_truncation_of_a_seed(tmp_path, ext):
    data = next(d for e, d in SEEDS if e == ext)
    for cut in range(len(data)):
        p = tmp_path / f"t{cut}{ext}"
        p.write_bytes(data[:cut])
        check_read(p, ext)


def test_corpus_regressions(tmp_path):
    for ext, data in SEEDS:
        p = tmp_path / f"r{ext}"
        p.write_bytes(data)
        check_read(p, ext)


def test_cli_reports_a_bad_vector_file_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.fvecs"
    bad.write_bytes(struct.pack("<i", 4) + b"\0" * 10)
    r = subprocess.run([sys.executable, "-m", "engramdb.cli", "index", "build", str(bad), "--out",
                        str(tmp_path / "idx")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "bad.fvecs" in (r.stderr + r.stdout)

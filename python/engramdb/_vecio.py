"""Readers for vector files: ``.npy``, ``.fvecs``, ``.bvecs`` (and ``.ivecs``
for ground-truth ids), each with a clear error on a malformed file.

The ``*vecs`` formats (from the TEXMEX corpus) store each vector as a
little-endian int32 dimension followed by that many components: float32 for
``.fvecs``, uint8 for ``.bvecs``, int32 for ``.ivecs``.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["VectorFileError", "read_vectors", "read_ids"]


class VectorFileError(ValueError):
    """A vector file that cannot be read: unknown extension, bad header,
    truncated records, inconsistent dimensions, wrong shape or dtype."""


_VECS = {".fvecs": np.dtype("<f4"), ".bvecs": np.dtype("u1"), ".ivecs": np.dtype("<i4")}


def _read_vecs(path: str, comp: np.dtype) -> np.ndarray:
    size = os.path.getsize(path)
    if size == 0:
        raise VectorFileError(f"{path}: file is empty")
    if size < 4:
        raise VectorFileError(f"{path}: {size} bytes is shorter than one 4-byte dimension header")
    raw = np.fromfile(path, dtype=np.uint8)
    dim = int(raw[:4].view("<i4")[0])
    if dim <= 0 or dim > 1_000_000:
        raise VectorFileError(f"{path}: first record declares dimension {dim}; not a {os.path.splitext(path)[1]} file?")
    rec = 4 + dim * comp.itemsize
    if size % rec != 0:
        raise VectorFileError(
            f"{path}: {size} bytes is not a whole number of {rec}-byte records "
            f"(dimension {dim}): truncated or not a {os.path.splitext(path)[1]} file"
        )
    n = size // rec
    recs = raw.reshape(n, rec)
    dims = recs[:, :4].copy().view("<i4").ravel()
    bad = np.nonzero(dims != dim)[0]
    if bad.size:
        raise VectorFileError(
            f"{path}: record {int(bad[0])} declares dimension {int(dims[bad[0]])}, the first declares {dim}"
        )
    return recs[:, 4:].copy().view(comp).reshape(n, dim)


def _check_npy_header_length(path: str) -> None:
    """np.load reads the header length from the file and asks for that many
    bytes before checking it: a 176-byte file claiming a 600 MB header made it
    allocate 600 MB (found by fuzzing). Refuse a length the file cannot hold."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
    if len(head) < 10 or head[:6] != b"\x93NUMPY":
        return  # not an .npy: np.load refuses it without reading a header
    if head[6] == 1:
        start, hlen = 10, int.from_bytes(head[8:10], "little")
    elif len(head) == 12:
        start, hlen = 12, int.from_bytes(head[8:12], "little")
    else:
        raise VectorFileError(f"{path}: truncated .npy header")
    if start + hlen > size:
        raise VectorFileError(f"{path}: .npy header claims {hlen} bytes, the file holds {size}")


def _read_npy(path: str) -> np.ndarray:
    _check_npy_header_length(path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except OSError as e:
        raise VectorFileError(f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - np.load parses untrusted bytes: any
        # failure means "not a readable array" (fuzzing found ValueError,
        # EOFError, SyntaxError and tokenize.TokenError from damaged headers)
        raise VectorFileError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from None
    if not isinstance(arr, np.ndarray):
        raise VectorFileError(f"{path}: holds {type(arr).__name__}, expected one array")
    return arr


def _check(path: str, arr: np.ndarray) -> None:
    if arr.ndim != 2:
        raise VectorFileError(f"{path}: expected a 2-D array (n, dim), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise VectorFileError(f"{path}: array of shape {arr.shape} holds no vectors")


def read_vectors(path: str | os.PathLike) -> np.ndarray:
    """Read a vector file as a C-contiguous float32 (n, dim) array."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VectorFileError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        arr = _read_npy(path)
        _check(path, arr)
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise VectorFileError(f"{path}: dtype {arr.dtype} is not numeric")
    elif ext in (".fvecs", ".bvecs"):
        arr = _read_vecs(path, _VECS[ext])
    else:
        raise VectorFileError(f"{path}: unknown extension {ext!r}; expected .npy, .fvecs or .bvecs")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        row = int(np.nonzero(~np.isfinite(out).all(axis=1))[0][0])
        raise VectorFileError(f"{path}: vector {row} holds NaN or infinite values")
    return out


def read_ids(path: str | os.PathLike) -> np.ndarray:
    """Read ground-truth ids (.npy or .ivecs) as an int64 (n, k) array."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise VectorFileError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        arr = _read_npy(path)
        _check(path, arr)
        if not np.issubdtype(arr.dtype, np.integer):
            raise VectorFileError(f"{path}: ground-truth ids must be integers, got {arr.dtype}")
    elif ext == ".ivecs":
        arr = _read_vecs(path, _VECS[ext])
    else:
        raise VectorFileError(f"{path}: unknown extension {ext!r}; expected .npy or .ivecs")
    return np.asarray(arr, dtype=np.int64)

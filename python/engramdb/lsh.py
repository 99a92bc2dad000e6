"""`LshIndex`: random-hyperplane (SimHash) LSH for cosine similarity.

A fast approximate filter and an honest baseline: ``tables`` hash tables of
``bits`` sign bits each; a query scores exactly only the vectors that share
a bucket with it in at least one table. More tables raise recall, more bits
cut candidates. Vectors are normalised on the way in.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import numpy as np

from . import _native
from .errors import InvalidArgumentError
from .store import _ids_array, as_matrix


class LshIndex:
    """An in-memory cosine LSH index.

    >>> idx = LshIndex(dim=384, tables=16, bits=12, seed=0)   # doctest: +SKIP
    >>> idx.add(vectors)                                       # ids 0..n-1
    >>> ids, scores = idx.search(queries, k=10)
    """

    def __init__(self, dim: int, tables: int = 16, bits: int = 12, seed: int = 0) -> None:
        for name, v in (("dim", dim), ("tables", tables), ("bits", bits)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise InvalidArgumentError(f"{name} must be a positive integer, got {v!r}")
        self._native = _native.NativeLsh(int(dim), tables=int(tables), bits=int(bits), seed=int(seed))
        self._next = 0

    @property
    def dim(self) -> int:
        return self._native.dim

    @property
    def tables(self) -> int:
        return self._native.tables

    @property
    def bits(self) -> int:
        return self._native.bits

    def __len__(self) -> int:
        return len(self._native)

    def add(self, vectors: Any, ids: Optional[Iterable[int]] = None) -> np.ndarray:
        """Add (or replace) vectors; ids default to consecutive integers."""
        m, _ = as_matrix(vectors, self.dim)
        idarr = _ids_array(ids, m.shape[0])
        if idarr is None:
            idarr = np.arange(self._next, self._next + m.shape[0], dtype=np.uint64)
        self._native.add(m, idarr)
        self._next = max(self._next, int(idarr.max()) + 1)
        return idarr

    def delete(self, ids: Union[int, Iterable[int]]) -> None:
        if isinstance(ids, (int, np.integer)):
            ids = [int(ids)]
        self._native.delete([int(i) for i in ids])

    def search(self, queries: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k by cosine: ``(ids, scores)`` of shape ``(k,)`` or
        ``(m, k)``; slots with no candidate hold ``MISSING_ID`` and NaN."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise InvalidArgumentError(f"k must be a positive integer, got {k!r}")
        m, single = as_matrix(queries, self.dim, "queries")
        ids, scores, kk = self._native.search(m, k=int(k))
        ids, scores = ids.reshape(-1, kk), scores.reshape(-1, kk)
        return (ids[0], scores[0]) if single else (ids, scores)

    @property
    def last_candidates(self) -> int:
        """Vectors scored exactly by the last search, summed over its queries."""
        return self._native.last_candidates()

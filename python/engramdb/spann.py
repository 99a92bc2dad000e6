"""SPANN: an on-disk approximate nearest-neighbour index for collections
bigger than RAM (Chen et al., NeurIPS 2021), with in-place updates in the
manner of SPFresh.

>>> import numpy as np, engramdb                                     # doctest: +SKIP
>>> idx = engramdb.SpannIndex.build(np.random.rand(10000, 64), "./idx")
>>> ids, scores = idx.search(np.random.rand(64), k=10)

Heads (a few percent of the vectors) stay in RAM; postings of int8 codes live
in 4 KiB checksummed pages on disk (``mode="disk"``) or in RAM
(``mode="memory"``); candidates are reranked with full-precision vectors.
Both modes return identical results.

Updates are durable when they return: ``add`` and ``delete`` append to a
CRC-framed write-ahead log in the index directory (fsync'd per call unless
``sync=False``), which :meth:`SpannIndex.open` replays; :meth:`SpannIndex.flush`
folds the log into the index files. One writer per directory (a second gets
``StoreLockedError``); readers open with ``read_only=True``.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Union

import numpy as np

from . import _native

__all__ = ["SpannIndex", "parse_bytes"]

ProgressArg = Union[bool, None, Callable[[str, int, int], Any]]

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40,
          "tib": 1 << 40}


def parse_bytes(v: int | str) -> int:
    """``512MB`` -> 536870912 (binary units); ints pass through."""
    if isinstance(v, (int, np.integer)):
        if v <= 0:
            raise ValueError(f"memory budget must be positive, got {v}")
        return int(v)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(v))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {v!r} as a size; write e.g. 512MB or 2GB")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError(f"memory budget must be positive, got {v!r}")
    return n


def _tqdm_progress() -> Callable[[str, int, int], None]:
    from tqdm.auto import tqdm

    bars: dict[str, Any] = {}

    def cb(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[stage] = tqdm(total=total, desc=f"spann {stage}", unit="vec", leave=False)
        bar.update(max(0, done - bar.n))
        if done >= total:
            bar.close()

    return cb


def _as_matrix(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 1:
        a = a.reshape(1, -1)
    if a.ndim != 2:
        raise ValueError(f"{what} must be 1-D or 2-D, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _as_ids(ids: Any, n: int) -> np.ndarray:
    a = np.asarray(ids)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"expected {n} ids, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"ids must be integers, got {a.dtype}")
    if a.size and np.issubdtype(a.dtype, np.signedinteger) and (a < 0).any():
        raise ValueError("ids must be non-negative")
    return np.ascontiguousarray(a, dtype=np.uint64)


class SpannIndex:
    """A SPANN index in a directory. Build with :meth:`build`, reopen with
    :meth:`open`."""

    def __init__(self, native: Any, path: str, read_only: bool = False):
        self._native = native
        self.path = path
        #: opened without the writer lock (writes raise ReadOnlyError)
        self.read_only = read_only
        #: whether reads bypass the page cache (see :meth:`open`)
        self.direct_io = False

    # -- construction -------------------------------------------------------
    @classmethod
    def build(
        cls,
        vectors: Any,
        path: str | os.PathLike,
        metric: str = "cosine",
        ids: Any = None,
        memory_budget: int | str | None = None,
        progress: ProgressArg = True,
        mode: str = "disk",
        sync: bool = True,
        **params: Any,
    ) -> SpannIndex:
        """Build an index over ``vectors`` (n x dim), save it in ``path`` and
        return it opened in ``mode`` as the directory's writer.

        ``memory_budget`` (bytes or a string such as ``"512MB"``) caps the RAM
        the opened disk index keeps resident (heads and the row table) by
        lowering ``head_ratio``. ``progress`` is True for tqdm bars, a callable
        ``(stage, done, total)``, or False. ``params``: ``head_ratio``,
        ``replicas``, ``posting_cap``, ``rng_factor``, ``nprobe``,
        ``coarse_probe``, ``epsilon``, ``rerank``, ... (see ``params()``).
        ``sync``: as in :meth:`open`.
        """
        a = np.asarray(vectors)
        if a.ndim != 2:
            raise ValueError(f"vectors must be a 2-D array (n, dim), got shape {a.shape}")
        a = np.ascontiguousarray(a, dtype=np.float32)
        n, dim = a.shape
        id_arr = None if ids is None else _as_ids(ids, n)
        if memory_budget is not None:
            budget = parse_bytes(memory_budget)
            fixed = n * 32 + (1 << 16)
            ratio = params.get("head_ratio", 0.05)
            room = (budget - fixed) / max(1, n * dim * 4 * 1.15)
            if room <= 0:
                from .errors import InvalidArgumentError

                raise InvalidArgumentError(
                    f"memory budget {budget} bytes is below the {fixed} bytes the row table of "
                    f"{n} vectors needs"
                )
            if room < ratio:
                params["head_ratio"] = max(room, 1.0 / max(n, 1))
        cb: Callable[[str, int, int], Any] | None
        if progress is True:
            cb = _tqdm_progress()
        elif callable(progress):
            cb = progress
        else:
            cb = None
        path = os.fspath(path)
        native = _native.NativeSpann.build(
            a, path, metric=metric, ids=id_arr, params=params or None, progress=cb, mode=mode, sync=sync
        )
        return cls(native, path)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        mode: str = "disk",
        direct_io: bool = False,
        *,
        read_only: bool = False,
        sync: bool = True,
    ) -> SpannIndex:
        """Open a saved index; ``mode="memory"`` loads postings and vectors.
        Updates acknowledged since the last :meth:`flush` are replayed from
        the log in either mode.

        The handle is the directory's one writer (a second writer, in this
        process or another, gets ``StoreLockedError``); ``read_only=True``
        opens without the lock, sees what was acknowledged when it opened,
        and refuses writes with ``ReadOnlyError``. In disk mode a handle
        holds no head vectors (queries rank heads by their codes; about half
        its resident RAM at 1M vectors): a writer reads them back from the
        index's metadata before its first write (a fraction of a second at
        1M), and keeps them from the start when replaying its log moved a
        head. ``sync=True`` (default)
        fsyncs the log on every ``add``/``delete`` call; with ``False`` an
        acknowledged update survives a process crash but not a power loss.
        ``direct_io=True`` reads pages with O_DIRECT, bypassing the page
        cache (falls back to cached reads where the file system refuses; see
        :attr:`direct_io`)."""
        path = os.fspath(path)
        native = _native.NativeSpann.open(path, mode=mode, read_only=read_only, sync=sync)
        idx = cls(native, path, read_only=read_only)
        if direct_io:
            idx.direct_io = bool(idx._native.set_direct_io(True))
        return idx

    # -- queries ------------------------------------------------------------
    def search(
        self,
        queries: Any,
        k: int = 10,
        *,
        nprobe: int | None = None,
        epsilon: float | None = None,
        coarse_probe: int | None = None,
        rerank: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (ids, scores) for one query (1-D: arrays of shape (k,))
        or a batch (2-D: (m, k)). Scores: cosine similarity, inner product,
        or squared L2 distance (lower is closer). Slots past the live vectors
        hold id 2**64-1 and score NaN. ``nprobe`` (postings read),
        ``coarse_probe`` (head lists scanned), ``epsilon`` (pruning) and
        ``rerank`` trade recall for speed."""
        single = np.ndim(queries) == 1
        q = _as_matrix(queries, "queries")
        ids, scores, kk = self._native.search(
            q, k=int(k), nprobe=nprobe, epsilon=epsilon, coarse_probe=coarse_probe, rerank=rerank
        )
        ids = ids.reshape(q.shape[0], kk)
        scores = scores.reshape(q.shape[0], kk)
        if single:
            return ids[0], scores[0]
        return ids, scores

    # -- updates ------------------------------------------------------------
    def add(self, vectors: Any, ids: Any, *, upsert: bool = False) -> None:
        """Insert vectors under new ids (``upsert=True`` replaces existing
        ones). Durable when it returns: the batch is in the write-ahead log
        (fsync'd unless opened with ``sync=False``) before it is applied."""
        v = _as_matrix(vectors, "vectors")
        self._native.add(v, _as_ids(ids, v.shape[0]), upsert=upsert)

    def delete(self, ids: Any) -> int:
        """Delete ids (unknown ones are ignored); returns how many existed.
        Durable when it returns, like :meth:`add`."""
        a = np.atleast_1d(np.asarray(ids))
        return int(self._native.delete(_as_ids(a, a.shape[0])))

    def flush(self) -> None:
        """Write modified postings, new vectors and metadata to disk and start
        a new, empty write-ahead log (updates are already durable without
        it; flushing bounds the log and the replay time of the next open)."""
        self._native.flush()

    def compact(self) -> dict:
        """Drop deleted and stale entries, merge small postings and rewrite
        the files; returns what it did (disk bytes before and after...)."""
        return dict(self._native.compact())

    def verify(self) -> dict:
        """Read every posting page and vector record, checking checksums;
        raises CorruptionError on damage."""
        return dict(self._native.verify())

    def stats(self) -> dict:
        """heads, postings, replicas, ram_bytes, disk_bytes (log included),
        log_bytes (updates not yet flushed) and what the last search read
        (last_postings_read, last_bytes_read, last_queries)."""
        return dict(self._native.stats())

    def params(self) -> dict:
        return dict(self._native.params())

    def ids(self) -> np.ndarray:
        """Ids of the live vectors (uint64)."""
        return np.asarray(self._native.ids())

    @property
    def dim(self) -> int:
        return int(self._native.dim)

    @property
    def metric(self) -> str:
        return str(self._native.metric)

    def __len__(self) -> int:
        return len(self._native)

    def close(self) -> None:
        self._native.close()

    def __enter__(self) -> SpannIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SpannIndex({self.path!r}, n={len(self)})"

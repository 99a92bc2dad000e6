"""`Store`: a durable vector store in a folder.

A thin layer over the native core: it converts inputs to C-contiguous
float32 once, encodes metadata and filters as JSON, and shapes results.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np

from . import _native
from .errors import DimensionMismatchError, EmptyInputError, InvalidArgumentError

#: Id in result slots past the matching records (2**64 - 1); its score is NaN.
MISSING_ID = np.iinfo(np.uint64).max

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class Record:
    """Everything stored for one id."""

    id: int
    vector: np.ndarray
    text: Optional[str]
    metadata: Optional[dict[str, Any]]
    user_id: Optional[str] = None
    agent_id: Optional[str] = None
    session_id: Optional[str] = None
    importance: float = 0.5
    strength: float = 1.0
    created_at: float = 0.0
    updated_at: float = 0.0
    last_access: float = 0.0
    access_count: int = 0
    archived: bool = False
    links: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Hit:
    """One result of :meth:`Store.recall`.

    ``score`` is what the hits are ranked by: the similarity alone, or with
    ``decay=True`` ``w_sim * similarity + w_ret * retention + w_imp *
    importance``; a hit reached through a link (``expanded=True``, ``via``
    the hit it came from) scores its parent's score times the link weight
    times 0.8. ``similarity`` is the metric's score (cosine, inner product,
    or squared L2 distance).
    """

    id: int
    score: float
    similarity: float
    retention: float
    importance: float
    expanded: bool = False
    via: Optional[int] = None


def _record_from(vector: np.ndarray, d: dict[str, Any]) -> Record:
    meta = d["metadata"]
    return Record(
        id=d["id"],
        vector=vector,
        text=d["text"],
        metadata=json.loads(meta) if meta is not None else None,
        user_id=d["user_id"],
        agent_id=d["agent_id"],
        session_id=d["session_id"],
        importance=d["importance"],
        strength=d["strength"],
        created_at=d["created_at"],
        updated_at=d["updated_at"],
        last_access=d["last_access"],
        access_count=d["access_count"],
        archived=d["archived"],
        links=list(d["links"]),
    )


def as_matrix(x: Any, dim: Optional[int] = None, name: str = "vectors") -> tuple[np.ndarray, bool]:
    """Coerce array-like input to a C-contiguous float32 (n, d) matrix, once.

    Returns the matrix and whether the input was a single 1-D vector.
    """
    try:
        a = np.asarray(x)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"{name} must be a numeric array: {e}") from None
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
        raise InvalidArgumentError(f"{name} must be numeric, got dtype {a.dtype}")
    single = a.ndim == 1
    if single:
        a = a.reshape(1, -1)
    if a.ndim != 2:
        raise DimensionMismatchError(f"{name} must be 1-D or 2-D, got shape {a.shape}")
    if a.shape[0] == 0:
        raise EmptyInputError(f"{name} is empty")
    if dim is not None and a.shape[1] != dim:
        raise DimensionMismatchError(f"dimension mismatch: expected {dim}, got {a.shape[1]}")
    return np.ascontiguousarray(a, dtype=np.float32), single


def _ids_array(ids: Any, n: int) -> Optional[np.ndarray]:
    if ids is None:
        return None
    a = np.asarray(ids)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim != 1 or len(a) != n:
        raise InvalidArgumentError(f"ids must be a list of {n} integers, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise InvalidArgumentError(f"ids must be integers, got dtype {a.dtype}")
    if a.size and np.issubdtype(a.dtype, np.signedinteger) and (a < 0).any():
        raise InvalidArgumentError("ids must be non-negative")
    return np.ascontiguousarray(a, dtype=np.uint64)


def _column(values: Any, n: int, name: str) -> Optional[list[Any]]:
    if values is None:
        return None
    if isinstance(values, (str, dict)):
        values = [values]
    values = list(values)
    if len(values) != n:
        raise InvalidArgumentError(f"{name} has {len(values)} entries for {n} vectors")
    return values


def _metadata_column(metadata: Any, n: int) -> Optional[list[Optional[str]]]:
    col = _column(metadata, n, "metadata")
    if col is None:
        return None
    out: list[Optional[str]] = []
    for m in col:
        if m is None:
            out.append(None)
        elif isinstance(m, dict):
            try:
                out.append(json.dumps(m, ensure_ascii=False, allow_nan=False))
            except (TypeError, ValueError) as e:
                raise InvalidArgumentError(f"metadata must be JSON-serialisable: {e}") from None
        else:
            raise InvalidArgumentError(f"metadata entries must be dicts or None, got {type(m).__name__}")
    return out


class Store:
    """A durable vector store in a folder.

    ``Store(path, dim=384)`` creates a store (or opens the existing one, checking
    ``dim``); ``Store(path)`` opens an existing one. One process may write at a
    time (a second writer gets :class:`~engramdb.errors.StoreLockedError`);
    ``read_only=True`` opens without the lock, for any number of readers.

    Metrics and scores: ``"cosine"`` (vectors are normalised on the way in;
    the score is the cosine similarity, higher is closer), ``"ip"`` (inner
    product, higher is closer) and ``"l2"`` (the score is the *squared*
    Euclidean distance, lower is closer; results still come nearest first).

    Every write is in the write-ahead log, fsync'd (``sync=True``, the
    default), before the call returns: it survives a crash of the process.

    Index: below ``ann_threshold`` records (100,000) every search is exact.
    From there on, searches without a filter or scope go through an
    approximate SPANN index held in memory (recall@10 ~0.95 on real
    sentence embeddings), built by the first such search after opening and
    kept current by every write; ``search(..., exact=True)`` forces an exact
    scan, filtered and scoped searches and :meth:`recall` are always exact,
    and ``ann_threshold=None`` switches the approximate index off.
    """

    def __init__(
        self,
        path: PathLike,
        dim: Optional[int] = None,
        metric: Optional[str] = None,
        *,
        read_only: bool = False,
        sync: bool = True,
        checkpoint_bytes: Optional[int] = None,
        ann_threshold: Optional[int] = 100_000,
    ) -> None:
        if dim is not None and (not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim < 1):
            raise InvalidArgumentError(f"dim must be a positive integer, got {dim!r}")
        self._path = os.fspath(path)
        self._native = _native.NativeStore(
            self._path,
            dim=None if dim is None else int(dim),
            metric=metric,
            read_only=read_only,
            sync=sync,
            checkpoint_bytes=checkpoint_bytes,
            ann_threshold=(2**63 if ann_threshold is None else int(ann_threshold)),
        )

    # -- properties -----------------------------------------------------
    @property
    def path(self) -> str:
        return self._path

    @property
    def dim(self) -> int:
        return self._native.dim

    @property
    def metric(self) -> str:
        return self._native.metric

    @property
    def read_only(self) -> bool:
        return self._native.read_only

    @property
    def closed(self) -> bool:
        return self._native.closed

    def __len__(self) -> int:
        return len(self._native)

    def __contains__(self, id: object) -> bool:
        if not isinstance(id, (int, np.integer)) or isinstance(id, bool) or id < 0:
            return False
        return int(id) in self._native

    def __repr__(self) -> str:
        if self.closed:
            return f"Store({self._path!r}, closed)"
        return f"Store({self._path!r}, dim={self.dim}, metric={self.metric!r}, count={len(self)})"

    # -- writing ----------------------------------------------------------
    def add(
        self,
        vectors: Any,
        ids: Optional[Iterable[int]] = None,
        texts: Optional[Sequence[Optional[str]]] = None,
        metadata: Optional[Sequence[Optional[dict[str, Any]]]] = None,
        *,
        user_id: Union[None, str, Sequence[Optional[str]]] = None,
        agent_id: Union[None, str, Sequence[Optional[str]]] = None,
        session_id: Union[None, str, Sequence[Optional[str]]] = None,
        importance: Union[None, float, Sequence[float]] = None,
        created_at: Union[None, float, Sequence[float]] = None,
        now: Optional[float] = None,
        auto_link: bool = False,
        link_k: int = 5,
        link_threshold: float = 0.75,
        dedupe: Optional[float] = None,
    ) -> np.ndarray:
        """Add vectors (shape ``(n, dim)``, or one ``(dim,)`` vector).

        ``ids`` are assigned when not given; an existing id raises
        :class:`~engramdb.errors.DuplicateIdError`. ``texts`` and ``metadata``
        (dicts of JSON values) are per-vector. Scope and memory attributes
        (``user_id``, ``importance``...) take one value for the batch or a
        list. Returns the ids as a ``uint64`` array. Nothing is stored if any
        input is rejected.

        ``auto_link=True`` links each new record, both ways, to up to
        ``link_k`` nearest records of its scope whose similarity is at least
        ``link_threshold`` (kind ``"similar"``, weight = similarity).
        ``dedupe=0.95`` skips a vector whose cosine similarity to an existing
        record of the same scope is at least 0.95 (candidates from LSH): that
        record's id is returned in its place and the record is reinforced.
        """
        return self._write(
            vectors, ids, texts, metadata, False, user_id, agent_id, session_id, importance, created_at, now,
            auto_link=auto_link, link_k=link_k, link_threshold=link_threshold, dedupe=dedupe,
        )

    def upsert(
        self,
        vectors: Any,
        ids: Iterable[int],
        texts: Optional[Sequence[Optional[str]]] = None,
        metadata: Optional[Sequence[Optional[dict[str, Any]]]] = None,
        *,
        user_id: Union[None, str, Sequence[Optional[str]]] = None,
        agent_id: Union[None, str, Sequence[Optional[str]]] = None,
        session_id: Union[None, str, Sequence[Optional[str]]] = None,
        importance: Union[None, float, Sequence[float]] = None,
        created_at: Union[None, float, Sequence[float]] = None,
        now: Optional[float] = None,
    ) -> np.ndarray:
        """Insert, or replace the vector, text and metadata of existing ids.

        A replaced record keeps its creation time, strength, access history
        and links.
        """
        if ids is None:
            raise InvalidArgumentError("upsert needs ids")
        return self._write(vectors, ids, texts, metadata, True, user_id, agent_id, session_id, importance, created_at, now)

    def _write(self, vectors, ids, texts, metadata, upsert, user_id, agent_id, session_id, importance, created_at, now, **link_opts):  # type: ignore[no-untyped-def]
        m, single = as_matrix(vectors, None)
        n = m.shape[0]
        if single and texts is not None and isinstance(texts, str):
            texts = [texts]
        if single and isinstance(metadata, dict):
            metadata = [metadata]
        if texts is not None:
            texts = _column(texts, n, "texts")
            for t in texts:  # type: ignore[union-attr]
                if t is not None and not isinstance(t, str):
                    raise InvalidArgumentError(f"texts must be str or None, got {type(t).__name__}")

        def per_item(v: Any, name: str) -> Optional[list[Any]]:
            if v is None:
                return None
            if isinstance(v, (str, int, float, np.floating, np.integer)):
                return [v] * n
            return _column(v, n, name)

        imp = per_item(importance, "importance")
        cat = per_item(created_at, "created_at")
        return self._native.add(
            m,
            ids=_ids_array(ids, n),
            texts=texts,
            metadata=_metadata_column(metadata, n),
            user_ids=per_item(user_id, "user_id"),
            agent_ids=per_item(agent_id, "agent_id"),
            session_ids=per_item(session_id, "session_id"),
            importance=None if imp is None else [float(x) for x in imp],
            created_at=None if cat is None else [float(x) for x in cat],
            upsert=upsert,
            now=now,
            **link_opts,
        )

    def delete(self, ids: Union[int, Iterable[int]]) -> int:
        """Delete ids; an unknown id raises :class:`~engramdb.errors.NotFoundError`
        and deletes nothing. Returns how many were deleted."""
        if isinstance(ids, (int, np.integer)):
            ids = [int(ids)]
        id_list = [int(i) for i in np.asarray(list(ids), dtype=np.uint64)] if ids is not None else []
        return self._native.delete(id_list)

    def flush(self) -> None:
        """Checkpoint: fold the write-ahead log into a new segment file.

        Writes are already durable when they return; flush bounds the log
        replayed on the next open.
        """
        self._native.flush()

    def close(self) -> None:
        """Release the writer lock and free memory. Safe to call twice."""
        self._native.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ----------------------------------------------------------
    def get(self, id: int) -> Record:
        """The record of ``id`` (its vector as stored: unit-normalised under cosine)."""
        vec, d = self._native.get(int(id))
        return _record_from(vec, d)

    def ids(
        self,
        filter: Optional[dict[str, Any]] = None,
        *,
        user_id: Optional[str] = None,
        agent_id: Optional[str] = None,
        session_id: Optional[str] = None,
        include_archived: bool = True,
        among: Optional[Iterable[int]] = None,
    ) -> np.ndarray:
        """Ids as a ``uint64`` array: every id (in no particular order), or,
        given a ``filter`` / scope / ``include_archived=False``, the ids a
        :meth:`search` with those arguments may return (ascending). With
        ``among``, only those of the given ids (in their order; unknown ids
        dropped), without scanning the whole store."""
        everything = filter is None and user_id is None and agent_id is None and session_id is None
        if everything and include_archived and among is None:
            return self._native.ids()
        return self._native.matching_ids(
            filter=self._filter_json(filter),
            user_id=user_id,
            agent_id=agent_id,
            session_id=session_id,
            include_archived=include_archived,
            among=None if among is None else [int(i) for i in among],
        )

    def search(
        self,
        queries: Any,
        k: int = 10,
        filter: Optional[dict[str, Any]] = None,
        *,
        user_id: Optional[str] = None,
        agent_id: Optional[str] = None,
        session_id: Optional[str] = None,
        include_archived: bool = False,
        exact: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Nearest neighbours: exact, or approximate past ``ann_threshold``
        (see the class docstring) unless ``exact=True``.

        ``queries`` is one ``(dim,)`` vector or a ``(m, dim)`` batch. Returns
        ``(ids, scores)`` of shape ``(k,)`` or ``(m, k)``, nearest first, with
        ``k`` capped at the store's size. ``filter`` is a metadata filter
        (``{"topic": "food", "year": {"gte": 2020}}``, with ``and``/``or``/
        ``not``, ``in``, ``nin``, ``ne``, ``contains``...); scope arguments
        restrict the search to one user / agent / session. When fewer records
        match than ``k``, the remaining slots hold ``MISSING_ID`` and NaN.
        """
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise InvalidArgumentError(f"k must be a positive integer, got {k!r}")
        m, single = as_matrix(queries, self.dim, "queries")
        fjson = self._filter_json(filter)
        ids, scores, kk = self._native.search(
            m,
            k=int(k),
            filter=fjson,
            user_id=user_id,
            agent_id=agent_id,
            session_id=session_id,
            include_archived=include_archived,
            exact=exact,
        )
        ids = ids.reshape(m.shape[0], kk)
        scores = scores.reshape(m.shape[0], kk)
        if single:
            return ids[0], scores[0]
        return ids, scores

    # -- memory semantics ---------------------------------------------------
    def recall(
        self,
        query: Any,
        k: int = 10,
        filter: Optional[dict[str, Any]] = None,
        *,
        user_id: Optional[str] = None,
        agent_id: Optional[str] = None,
        session_id: Optional[str] = None,
        include_archived: bool = False,
        now: Optional[float] = None,
        decay: bool = True,
        weights: tuple[float, float, float] = (1.0, 0.3, 0.2),
        reinforce: Optional[bool] = None,
        expand_links: int = 0,
    ) -> list[Hit]:
        """Recall memories for one query vector, as a ranked list of :class:`Hit`.

        With ``decay=True`` (the default) hits are ranked by
        ``weights[0] * similarity + weights[1] * retention + weights[2] *
        importance`` (retention on the forgetting curve at ``now``, importance
        in [0, 1]); the top ``k`` is exact under that score. ``expand_links=n``
        adds records up to ``n`` links away (marked ``expanded``). A recall
        reinforces the direct hits (strength += 1, clock reset) when
        ``reinforce`` is True, or by default when ``decay`` is on and the
        store is writable; ``reinforce=False`` makes it read-only.
        """
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise InvalidArgumentError(f"k must be a positive integer, got {k!r}")
        if expand_links < 0:
            raise InvalidArgumentError("expand_links must be >= 0")
        m, single = as_matrix(query, self.dim, "query")
        if not single and m.shape[0] != 1:
            raise InvalidArgumentError("recall takes one query vector")
        w = tuple(float(x) for x in weights)
        if len(w) != 3 or not all(np.isfinite(w)):
            raise InvalidArgumentError("weights must be three finite numbers (similarity, retention, importance)")
        rows = self._native.recall(
            m[0],
            k=int(k),
            filter=self._filter_json(filter),
            user_id=user_id,
            agent_id=agent_id,
            session_id=session_id,
            include_archived=include_archived,
            now=now,
            decay=decay,
            weights=w,  # type: ignore[arg-type]
            reinforce=reinforce,
            expand_links=int(expand_links),
        )
        return [Hit(*row) for row in rows]

    def retention(self, ids: Union[int, Iterable[int]], now: Optional[float] = None) -> np.ndarray:
        """Retention ``R = exp(-dt / S)`` of each id at ``now`` (default: the
        current time): ``dt`` in decay units (days by default) since the last
        recall, ``S`` the strength."""
        single = isinstance(ids, (int, np.integer))
        out = self._native.retention([int(ids)] if single else [int(i) for i in ids], now=now)  # type: ignore[union-attr]
        return out

    def reinforce(self, ids: Iterable[int], now: Optional[float] = None) -> None:
        """Record a recall of ``ids`` at ``now``: strength grows, the clock restarts."""
        self._native.reinforce([int(i) for i in ids], now=now)

    def forget(
        self,
        threshold: float = 0.05,
        now: Optional[float] = None,
        action: str = "archive",
        dry_run: bool = False,
        filter: Optional[dict[str, Any]] = None,
        *,
        user_id: Optional[str] = None,
        agent_id: Optional[str] = None,
        session_id: Optional[str] = None,
    ) -> dict[str, Any]:
        """Archive (default) or delete every record whose retention at ``now`` is
        below ``threshold``, within the given scope and filter.

        Archived records stay stored but are left out of searches unless
        ``include_archived=True``. Returns a report: ``action``, ``examined``,
        ``ids`` (affected), ``retentions``, ``dry_run``. With ``dry_run`` nothing
        changes.
        """
        if action not in ("archive", "delete"):
            raise InvalidArgumentError(f"action must be 'archive' or 'delete', got {action!r}")
        if not np.isfinite(threshold):
            raise InvalidArgumentError("threshold must be finite")
        return dict(
            self._native.forget(
                threshold=float(threshold),
                now=now,
                delete=action == "delete",
                dry_run=dry_run,
                filter=self._filter_json(filter),
                user_id=user_id,
                agent_id=agent_id,
                session_id=session_id,
            )
        )

    def link(self, a: int, b: int, kind: str = "related", weight: float = 1.0) -> None:
        """Link two records both ways (replacing an existing link's kind and weight).
        A record keeps at most ``max_degree`` links (16); the weakest goes first."""
        self._native.link(int(a), int(b), kind, float(weight))

    def unlink(self, a: int, b: int) -> bool:
        """Remove the link between two records; returns whether there was one."""
        return self._native.unlink(int(a), int(b))

    def links(self, id: int) -> list[tuple[int, str, float]]:
        """``(target, kind, weight)`` of each link of ``id``."""
        return self._native.links(int(id))

    def configure(
        self,
        *,
        decay_unit: Optional[float] = None,
        reinforce_increment: Optional[float] = None,
        reset_on_recall: Optional[bool] = None,
        max_degree: Optional[int] = None,
    ) -> None:
        """Tune this handle: ``decay_unit`` in seconds (86400: strength counts
        days), the strength a recall adds (1.0), whether a recall restarts the
        clock (True), the most links per record (16)."""
        self._native.configure(
            decay_unit_seconds=decay_unit,
            reinforce_increment=reinforce_increment,
            reset_on_recall=reset_on_recall,
            max_degree=max_degree,
        )

    @staticmethod
    def _filter_json(filter: Optional[dict[str, Any]]) -> Optional[str]:
        if filter is None:
            return None
        if not isinstance(filter, dict):
            raise InvalidArgumentError("filter must be a dict")
        try:
            return json.dumps(filter, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"filter must be JSON-serialisable: {e}") from None

    def info(self) -> dict[str, Any]:
        """Size, files and format facts about the store."""
        return dict(self._native.info())


def verify(path: PathLike) -> dict[str, Any]:
    """Check every checksum and structure of the store at ``path`` without
    locking it. Raises :class:`~engramdb.errors.CorruptionError` on damage."""
    return dict(_native.verify_store(os.fspath(path)))

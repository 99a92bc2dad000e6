"""`Memory`: text in, relevant memories out; long-term memory for an agent in a folder.

>>> import engramdb
>>> mem = engramdb.Memory("./agent-memory")                 # doctest: +SKIP
>>> mid = mem.add("Caroline joined an LGBTQ support group on 7 May", user_id="mel")
>>> hits = mem.search("when did Caroline join the support group?", user_id="mel", k=5)

A memory folder holds::

    memory.json      format, embedder model id and dimension (checked on open)
    store/           the engramdb Store (vectors, texts, metadata, scopes, decay state, links)
    history.jsonl    one line per ADD / UPDATE / DELETE / FORGET event, append-only

**Retrieval.** ``search(mode="hybrid")`` (the default) takes the best candidates of the
store's vector search and of a BM25 keyword search (:mod:`engramdb.bm25`) over the same
scope and filter, fuses them into a relevance in [0, 1] (``fusion="sum"``, the default:
alpha x min-max similarity + (1 - alpha) x min-max BM25; or reciprocal rank fusion,
``fusion="rrf"``), and ranks by the three-part score of Generative Agents (Park et
al. 2023)::

    score = w0 * relevance + w1 * retention + w2 * importance      (weights=(1.0, 0.3, 0.2))

``retention`` is the store's forgetting curve R = exp(-dt / S) (dt in days since the
last recall, S the strength; MemoryBank), dropped when ``decay=False``. When memories
are added with ``timestamp=``, that time is their creation and last-access time, so
decay follows the story's clock: pass the story's ``now=`` to ``search``.
``mode="vector"`` uses the cosine similarity as relevance (with decay its candidates
come from the store's exact decayed ``recall``), ``mode="keyword"`` the BM25 score
divided by the best one. ``expand_links=1`` adds each hit's linked memories (1 hop)
with score ``parent score x link weight x link_discount`` (0.8, as in the store),
marked ``expanded=True`` with ``via`` set; they compete for the same ``k`` slots.
A search is read-only unless ``reinforce=True`` (or a reader built with
``reinforce=True`` packs the memory into a prompt): only then does recall restart a
memory's forgetting curve.

**Text rules.** Texts must be non-empty ``str`` (or UTF-8 ``bytes``); empty or
whitespace-only text is :class:`~engramdb.errors.EmptyInputError`, invalid UTF-8 or a
lone surrogate :class:`~engramdb.errors.InvalidArgumentError` (both ``ValueError``).
Long texts are stored whole and fully keyword-indexed, but the default embedder only
sees the first 256 tokens (about 180 words); pass ``chunk_tokens=`` to ``add`` to split a
long text into several memories instead (linked in order, ``metadata["chunk"]``).

**Scopes.** ``user_id`` / ``agent_id`` / ``session_id`` partition memories strictly: a
search in one scope never returns another's. A scope with no memories is not an
error: its searches and listings are empty.

**History.** Kept in ``history.jsonl`` beside the store rather than in each record's
metadata: metadata stays what the user put there (filters, exports and the LangChain /
Mem0 adapters see only that), a record does not grow with every edit, and the
history of a deleted memory survives its deletion. The store is written first: a crash
between the two writes can lose a history line, never a memory.

**Threads.** A ``Memory`` may be shared between threads: embedding runs outside the
lock (in parallel), store and keyword-index writes are serialised.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .bm25 import BM25Index
from .embedders import as_embedder, validate_texts
from .errors import (
    DimensionMismatchError,
    EmptyInputError,
    FormatVersionError,
    InvalidArgumentError,
    NotFoundError,
)
from .store import MISSING_ID, Store

__all__ = ["Memory", "MemoryItem", "MemoryHit", "to_epoch"]

CONFIG_FILE = "memory.json"
STORE_DIR = "store"
HISTORY_FILE = "history.jsonl"
FORMAT = "engramdb.memory"
FORMAT_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]
TimeLike = Union[None, float, int, str, _dt.datetime, _dt.date]


# --------------------------------------------------------------------------- values


@dataclass
class MemoryItem:
    """One stored memory (what ``get`` and ``get_all`` return)."""

    id: int
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["links"] = [list(x) for x in self.links]
        return d


@dataclass
class MemoryHit:
    """One search result. ``score`` ranks; the parts are reported for inspection.

    ``similarity`` is the cosine similarity to the query, ``keyword`` the BM25 score
    (None where the memory shares no term with the query), ``retention`` the forgetting
    curve at ``now``, ``expanded``/``via`` mark a memory reached through a link.
    """

    id: int
    text: str
    score: float
    similarity: float
    retention: float
    importance: float
    metadata: dict[str, Any]
    created_at: float
    links: list[tuple[int, str, float]]
    user_id: Optional[str] = None
    agent_id: Optional[str] = None
    session_id: Optional[str] = None
    keyword: Optional[float] = None
    relevance: float = 0.0
    expanded: bool = False
    via: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["links"] = [list(x) for x in self.links]
        return d


# --------------------------------------------------------------------------- helpers


def to_epoch(t: TimeLike) -> Optional[float]:
    """Seconds since the Unix epoch from a number, ``datetime``/``date`` (naive = UTC)
    or an ISO 8601 string. ``None`` stays ``None``."""
    if t is None:
        return None
    if isinstance(t, bool):
        raise InvalidArgumentError("a time must be a number, datetime or ISO string, not bool")
    if isinstance(t, (int, float, np.integer, np.floating)):
        v = float(t)
        if not math.isfinite(v):
            raise InvalidArgumentError(f"time must be finite, got {t!r}")
        return v
    if isinstance(t, str):
        s = t.strip()
        if s.endswith("Z"):
            s = s[:-1] + "+00:00"
        try:
            t = _dt.datetime.fromisoformat(s)
        except ValueError:
            raise InvalidArgumentError(f"not an ISO 8601 time: {t!r}") from None
    if isinstance(t, _dt.datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=_dt.timezone.utc)
        return t.timestamp()
    if isinstance(t, _dt.date):
        return _dt.datetime(t.year, t.month, t.day, tzinfo=_dt.timezone.utc).timestamp()
    raise InvalidArgumentError(f"a time must be a number, datetime or ISO string, got {type(t).__name__}")


def _clean_texts(texts: Sequence[Any]) -> list[str]:
    try:
        return validate_texts(list(texts))
    except ValueError as e:
        msg = str(e)
        if "empty" in msg:
            raise EmptyInputError(msg) from None
        raise InvalidArgumentError(msg) from None




def _item(d: dict[str, Any]) -> MemoryItem:
    meta = d.get("metadata")
    if isinstance(meta, str):
        meta = json.loads(meta)
    return MemoryItem(
        id=int(d["id"]),
        text=d.get("text") or "",
        metadata=meta or {},
        user_id=d.get("user_id"),
        agent_id=d.get("agent_id"),
        session_id=d.get("session_id"),
        importance=float(d.get("importance", 0.5)),
        strength=float(d.get("strength", 1.0)),
        created_at=float(d.get("created_at", 0.0)),
        updated_at=float(d.get("updated_at", 0.0)),
        last_access=float(d.get("last_access", 0.0)),
        access_count=int(d.get("access_count", 0)),
        archived=bool(d.get("archived", False)),
        links=[(int(t), str(k), float(w)) for t, k, w in d.get("links", [])],
    )


def _minmax(scores: dict[int, float]) -> dict[int, float]:
    if not scores:
        return {}
    lo, hi = min(scores.values()), max(scores.values())
    if hi - lo <= 1e-12:
        return {i: 1.0 for i in scores}
    return {i: (s - lo) / (hi - lo) for i, s in scores.items()}


class _RWLock:
    """Shared reads, exclusive writes, writer preference; re-entrant for the writer
    (which may also read). ``with lock:`` is a write; ``with lock.read():`` a read.

    Memory never lets a native read run while a native write is in flight: the
    store's binding holds its lock inside a shared worker pool, and a worker that
    holds the write lock can pick up a queued search and wait on itself.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: Optional[int] = None
        self._depth = 0
        self._waiting = 0

    def __enter__(self) -> _RWLock:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._depth += 1
                return self
            self._waiting += 1
            while self._writer is not None or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer, self._depth = me, 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._depth -= 1
            if self._depth == 0:
                self._writer = None
                self._cond.notify_all()

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:  # the writer reading its own state
                owned = True
            else:
                owned = False
                while self._writer is not None or self._waiting:
                    self._cond.wait()
                self._readers += 1
        try:
            yield
        finally:
            if not owned:
                with self._cond:
                    self._readers -= 1
                    if not self._readers:
                        self._cond.notify_all()


# --------------------------------------------------------------------------- Memory


class Memory:
    """Long-term memory in a folder: texts, their embeddings, scopes, decay and links.

    ``Memory(path)`` creates the folder or opens it; ``embedder`` is ``None`` for the
    bundled offline all-MiniLM-L6-v2 or any callable ``list[str] -> ndarray (n, dim)``.
    The embedder's model id and dimension are saved in ``memory.json``; opening with
    an embedder of another dimension raises
    :class:`~engramdb.errors.DimensionMismatchError` (another model id of the same
    dimension only warns: its vectors would not be comparable). ``read_only=True``
    opens without the writer lock (search, get, export).
    """

    def __init__(
        self,
        path: PathLike,
        embedder: Any = None,
        *,
        read_only: bool = False,
        sync: bool = True,
    ) -> None:
        self._path = Path(os.fspath(path))
        self._embedder = as_embedder(embedder)
        self._lock = _RWLock()
        self._hist_lock = threading.Lock()
        cfg_path = self._path / CONFIG_FILE
        if cfg_path.exists():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise InvalidArgumentError(f"{cfg_path}: unreadable memory config: {e}") from None
            if cfg.get("format") != FORMAT:
                raise InvalidArgumentError(f"{cfg_path} is not an engramdb memory config")
            if int(cfg.get("version", 0)) > FORMAT_VERSION:
                raise FormatVersionError(
                    f"{cfg_path}: memory format version {cfg.get('version')} is newer than this "
                    f"engramdb reads ({FORMAT_VERSION}); upgrade engramdb"
                )
            emb = cfg.get("embedder", {})
            dim = self._embedder_dim()
            if int(emb.get("dim", -1)) != dim:
                raise DimensionMismatchError(
                    f"the memory at {self._path} was built with embedder {emb.get('model_id')!r} "
                    f"(dim {emb.get('dim')}), but the given embedder {self.model_id!r} has dim {dim}: "
                    f"open it with the same embedder, or re-embed into a new folder "
                    f"(engramdb mem export / import)"
                )
            if emb.get("model_id") != self.model_id:
                warnings.warn(
                    f"the memory at {self._path} was built with embedder {emb.get('model_id')!r}, "
                    f"now opened with {self.model_id!r} (same dim {dim}): vectors from two models "
                    f"are not comparable",
                    UserWarning,
                    stacklevel=2,
                )
            self._config = cfg
        else:
            if read_only:
                raise NotFoundError(f"no engramdb memory at {self._path}")
            self._path.mkdir(parents=True, exist_ok=True)
            self._config = {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "embedder": {"model_id": self.model_id, "dim": self._embedder_dim()},
                "metric": "cosine",
                "created_at": time.time(),
            }
            tmp = cfg_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self._config, indent=2), encoding="utf-8")
            os.replace(tmp, cfg_path)
        dim = int(self._config["embedder"]["dim"])
        self._store = Store(
            self._path / STORE_DIR,
            dim=None if read_only else dim,
            metric=None if read_only else "cosine",
            read_only=read_only,
            sync=sync,
        )
        self._dim = int(self._store.dim)
        self._history_path = self._path / HISTORY_FILE
        self._hist_checked = False
        self._sync = sync
        self._bm25 = BM25Index()
        self._rebuild_keyword_index()

    # -- basics -----------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._path

    @property
    def store(self) -> Store:
        """The underlying vector :class:`~engramdb.Store`."""
        return self._store

    @property
    def embedder(self) -> Any:
        return self._embedder

    @property
    def model_id(self) -> str:
        return str(getattr(self._embedder, "model_id", None) or type(self._embedder).__name__)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def keyword_index(self) -> BM25Index:
        return self._bm25

    def _embedder_dim(self) -> int:
        try:
            return int(self._embedder.dim)
        except (AttributeError, ValueError):
            return int(self._embedder(["dimension probe"]).shape[1])

    def __len__(self) -> int:
        with self._lock.read():
            return len(self._store)

    def __contains__(self, id: object) -> bool:
        with self._lock.read():
            return id in self._store

    def vector(self, id: int) -> np.ndarray:
        """The stored (unit-length) vector of memory ``id``."""
        with self._lock.read():
            return self._store.get(int(id)).vector

    def __repr__(self) -> str:
        return f"Memory({str(self._path)!r}, model={self.model_id!r}, count={len(self)})"

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _records(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        ids = [int(i) for i in ids]
        for s in range(0, len(ids), 4096):
            out.extend(self._store._native.get_records(ids[s : s + 4096]))
        return out

    def _rebuild_keyword_index(self) -> None:
        """Index every stored text for BM25 (done on open; about 1-2 s per 100k texts)."""
        self._bm25.clear()
        ids = self._store.ids().tolist()
        for s in range(0, len(ids), 8192):
            self._bm25.add_many(
                (
                    int(d["id"]),
                    d.get("text"),
                    (d.get("user_id"), d.get("agent_id"), d.get("session_id")),
                    bool(d.get("archived", False)),
                )
                for d in self._records(ids[s : s + 8192])
            )

    def _embed(self, texts: list[str]) -> np.ndarray:
        v = np.asarray(self._embedder(texts), dtype=np.float32)
        if v.ndim != 2 or v.shape[0] != len(texts):
            raise InvalidArgumentError(f"the embedder returned shape {v.shape} for {len(texts)} texts")
        if v.shape[1] != self.dim:
            raise DimensionMismatchError(f"the embedder returned dim {v.shape[1]}, the memory has {self.dim}")
        return v

    # -- history ------------------------------------------------------------------
    def _log(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        data = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events)
        with self._hist_lock, open(self._history_path, "a+b") as f:
            if not self._hist_checked:
                # a crash may have left a torn last line: start on a fresh one
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        data = "\n" + data
                self._hist_checked = True
            f.write(data.encode("utf-8"))
            f.flush()
            if self._sync:
                os.fsync(f.fileno())

    def history(self, id: int) -> list[dict[str, Any]]:
        """Every event of memory ``id``, oldest first: dicts with ``event`` (ADD,
        UPDATE, DELETE, FORGET), ``at`` (wall-clock seconds), ``text``/``metadata``
        (the new values) and ``old_text``/``old_metadata`` for UPDATE and DELETE.
        An id never seen gives an empty list."""
        out = []
        if not self._history_path.exists():
            return out
        with self._hist_lock, open(self._history_path, encoding="utf-8") as f:
            lines = f.readlines()
        for line in lines:
            line = line.strip()
            if not line:
                continue
            try:
                e = json.loads(line)
            except ValueError:  # a torn last line after a crash
                continue
            if e.get("id") == int(id):
                out.append(e)
        return out

    # -- writing ------------------------------------------------------------------
    def add(
        self,
        content: Union[str, bytes, Sequence[Any]],
        *,
        user_id: Optional[str] = None,
        agent_id: Optional[str] = None,
        session_id: Optional[str] = None,
        metadata: Union[None, dict[str, Any], Sequence[Optional[dict[str, Any]]]] = None,
        importance: Union[None, float, Sequence[float]] = None,
        timestamp: Union[TimeLike, Sequence[TimeLike]] = None,
        auto_link: bool = False,
        link_k: int = 5,
        link_threshold: float = 0.75,
        dedupe: Optional[float] = None,
        chunk_tokens: Optional[int] = None,
    ) -> Union[int, list[int]]:
        """Store ``content`` and return its id.

        ``content`` is one text (returns an ``int``), a list of texts (a batch,
        embedded together; returns a list of ids) or chat messages, a list of
        ``{"role", "content"}`` dicts (one memory per message, the role in
        ``metadata["role"]``, an optional ``"name"`` in ``metadata["name"]``; returns
        a list). ``metadata``, ``importance`` (in [0, 1], default 0.5) and
        ``timestamp`` (epoch seconds, ``datetime`` or ISO string: the memory's
        creation and last-access time, default now) take one value or one per item.
        ``auto_link`` links each new memory to its nearest neighbours in the same
        scope (A-MEM); ``dedupe=0.95`` returns the id of an existing near-duplicate
        (cosine >= 0.95, same scope) instead of inserting, and reinforces it.
        ``chunk_tokens=n`` splits texts longer than ``n`` embedder tokens into several
        memories (returns a list of ids); by default a long text is kept whole and
        the embedder sees its first 256 tokens.
        """
        single = isinstance(content, (str, bytes, bytearray))
        items = [content] if single else list(content)  # type: ignore[arg-type]
        if not items:
            raise EmptyInputError("nothing to add: an empty list")
        n = len(items)

        def per(v: Any, name: str) -> list[Any]:
            if v is None or isinstance(v, (dict, str, bytes, int, float, np.number, _dt.datetime, _dt.date)):
                return [v] * n
            vs = list(v)
            if len(vs) != n:
                raise InvalidArgumentError(f"{name} has {len(vs)} entries for {n} items")
            return vs

        metas = per(metadata, "metadata")
        imps = per(importance, "importance")
        stamps = [to_epoch(t) for t in per(timestamp, "timestamp")]
        texts: list[Any] = []
        for i, it in enumerate(items):
            m = dict(metas[i]) if metas[i] is not None else {}
            if not isinstance(metas[i], (dict, type(None))):
                raise InvalidArgumentError(f"metadata must be a dict, got {type(metas[i]).__name__}")
            if isinstance(it, dict):
                if "content" not in it:
                    raise InvalidArgumentError(f"message {i} has no 'content'")
                if "role" in it:
                    m.setdefault("role", it["role"])
                if it.get("name"):
                    m.setdefault("name", it["name"])
                it = it["content"]
            texts.append(it)
            metas[i] = m or None
        clean = _clean_texts(texts)
        for imp in imps:
            if imp is not None and not (isinstance(imp, (int, float)) and 0.0 <= float(imp) <= 1.0):
                raise InvalidArgumentError(f"importance must be a number in [0, 1], got {imp!r}")
        if chunk_tokens is not None:
            clean, metas, imps, stamps, groups = self._chunk(clean, metas, imps, stamps, int(chunk_tokens))
            single = single and len(clean) == 1
        else:
            groups = None
        vecs = self._embed(clean)
        ids = self._write(
            vecs,
            clean,
            metas,
            imps,
            stamps,
            (user_id, agent_id, session_id),
            auto_link,
            link_k,
            link_threshold,
            dedupe,
        )
        if groups and hasattr(self._store, "link"):
            for g in groups:
                for a, b in zip(g, g[1:]):
                    self.link(ids[a], ids[b], kind="next", weight=1.0)
        return ids[0] if single else ids

    def _chunk(self, texts, metas, imps, stamps, max_tokens):  # type: ignore[no-untyped-def]
        if max_tokens < 8:
            raise InvalidArgumentError("chunk_tokens must be at least 8")
        counter = getattr(self._embedder, "token_lengths", None)
        out_t: list[str] = []
        out_m: list[Any] = []
        out_i: list[Any] = []
        out_s: list[Any] = []
        groups: list[list[int]] = []
        for t, m, imp, ts in zip(texts, metas, imps, stamps):
            words = t.split()
            # tokens per word, measured with the embedder's tokenizer when it has one
            if counter is not None:
                per_word = max(1.0, (counter([t])[0] - 2) / max(1, len(words)))
            else:
                per_word = 1.3
            step = max(1, int((max_tokens - 2) / per_word))
            if len(words) <= step:
                pieces = [t]
            else:
                pieces = [" ".join(words[s : s + step]) for s in range(0, len(words), step)]
            g = []
            for j, p in enumerate(pieces):
                g.append(len(out_t))
                out_t.append(p)
                mm = dict(m or {})
                if len(pieces) > 1:
                    mm["chunk"] = j
                    mm["chunks"] = len(pieces)
                out_m.append(mm or None)
                out_i.append(imp)
                out_s.append(ts)
            if len(g) > 1:
                groups.append(g)
        return out_t, out_m, out_i, out_s, groups

    def _write(self, vecs, texts, metas, imps, stamps, scope, auto_link, link_k, link_threshold, dedupe):  # type: ignore[no-untyped-def]
        user_id, agent_id, session_id = scope
        extra: dict[str, Any] = {}
        if auto_link:
            extra.update(auto_link=True, link_k=link_k, link_threshold=link_threshold)
        if dedupe is not None:
            extra["dedupe"] = float(dedupe)
        imp_arg = None if all(i is None for i in imps) else [0.5 if i is None else float(i) for i in imps]
        now = time.time()
        cat = None if all(s is None for s in stamps) else [now if s is None else s for s in stamps]
        with self._lock:
            ids = self._store.add(
                vecs,
                texts=texts,
                metadata=metas,
                user_id=user_id,
                agent_id=agent_id,
                session_id=session_id,
                importance=imp_arg,
                created_at=cat,
                **extra,
            )
            ids = [int(i) for i in ids]
            events = []
            at = time.time()
            for i, t, m in zip(ids, texts, metas):
                if i in self._bm25:
                    continue  # a near-duplicate that was reinforced, not inserted
                self._bm25.add(i, t, (user_id, agent_id, session_id), False)
                events.append({"id": i, "event": "ADD", "at": at, "text": t, "metadata": m})
            self._log(events)
        return ids

    def upsert(
        self,
        ids: Sequence[int],
        texts: Sequence[Union[str, bytes]],
        *,
        vectors: Any = None,
        metadata: Union[None, dict[str, Any], Sequence[Optional[dict[str, Any]]]] = None,
        user_id: Union[None, str, Sequence[Optional[str]]] = None,
        agent_id: Union[None, str, Sequence[Optional[str]]] = None,
        session_id: Union[None, str, Sequence[Optional[str]]] = None,
        importance: Union[None, float, Sequence[float]] = None,
        timestamp: Union[TimeLike, Sequence[TimeLike]] = None,
    ) -> list[int]:
        """Insert memories under the given ids, or replace the text, vector, metadata
        and scope of existing ones (which keep their strength, access history and
        links; history records ADD or UPDATE). ``vectors`` (n, dim) skips embedding.
        For adapters that choose their own ids (LangChain, Mem0)."""
        id_list = [int(i) for i in ids]
        n = len(id_list)
        if n == 0:
            return []
        if len(set(id_list)) != n:
            raise InvalidArgumentError("upsert ids must be distinct")
        clean = _clean_texts(list(texts))
        if len(clean) != n:
            raise InvalidArgumentError(f"{len(clean)} texts for {n} ids")

        def per(v: Any, name: str) -> list[Any]:
            if v is None or isinstance(v, (dict, str, bytes, int, float, np.number, _dt.datetime, _dt.date)):
                return [v] * n
            vs = list(v)
            if len(vs) != n:
                raise InvalidArgumentError(f"{name} has {len(vs)} entries for {n} items")
            return vs

        metas = [dict(m) if m else None for m in per(metadata, "metadata")]
        users, agents, sessions = (
            per(user_id, "user_id"),
            per(agent_id, "agent_id"),
            per(session_id, "session_id"),
        )
        stamps = [to_epoch(t) for t in per(timestamp, "timestamp")]
        imps = per(importance, "importance")
        if vectors is None:
            vecs = self._embed(clean)
        else:
            vecs = np.asarray(vectors, dtype=np.float32).reshape(n, -1)
        with self._lock:
            old = {int(d["id"]): d for d in self._records([i for i in id_list if i in self._store])}
            now = time.time()
            self._store.upsert(
                vecs,
                ids=id_list,
                texts=clean,
                metadata=metas,
                user_id=users,
                agent_id=agents,
                session_id=sessions,
                importance=[
                    float(imp) if imp is not None else float(old[i]["importance"]) if i in old else 0.5
                    for i, imp in zip(id_list, imps)
                ],
                created_at=[
                    ts if ts is not None else float(old[i]["created_at"]) if i in old else now
                    for i, ts in zip(id_list, stamps)
                ],
            )
            events = []
            for i, t, m, u, a, se in zip(id_list, clean, metas, users, agents, sessions):
                prev = old.get(i)
                self._bm25.add(i, t, (u, a, se), bool(prev and prev.get("archived")))
                if prev is None:
                    events.append({"id": i, "event": "ADD", "at": now, "text": t, "metadata": m})
                else:
                    events.append(
                        {
                            "id": i,
                            "event": "UPDATE",
                            "at": now,
                            "old_text": prev.get("text"),
                            "text": t,
                            "old_metadata": _item(prev).metadata,
                            "metadata": m,
                        }
                    )
            self._log(events)
        return id_list

    def update(
        self,
        id: int,
        text: Optional[Union[str, bytes]] = None,
        metadata: Optional[dict[str, Any]] = None,
        *,
        importance: Optional[float] = None,
    ) -> MemoryItem:
        """Replace the text (re-embedded) and/or metadata of memory ``id``; the old
        values go to :meth:`history`. The memory keeps its id, scope, creation time,
        strength, access history and links. Returns the updated memory."""
        with self._lock:
            rec = self._store.get(int(id))
            new_text = rec.text or ""
            if text is not None:
                new_text = _clean_texts([text])[0]
            vec = self._embed([new_text]) if text is not None else rec.vector.reshape(1, -1)
            if metadata is not None and not isinstance(metadata, dict):
                raise InvalidArgumentError("metadata must be a dict")
            new_meta = rec.metadata if metadata is None else metadata
            self._store.upsert(
                vec,
                ids=[int(id)],
                texts=[new_text],
                metadata=[new_meta],
                user_id=rec.user_id,
                agent_id=rec.agent_id,
                session_id=rec.session_id,
                importance=rec.importance if importance is None else float(importance),
                created_at=rec.created_at,
            )
            self._bm25.add(int(id), new_text, (rec.user_id, rec.agent_id, rec.session_id), rec.archived)
            self._log(
                [
                    {
                        "id": int(id),
                        "event": "UPDATE",
                        "at": time.time(),
                        "old_text": rec.text,
                        "text": new_text,
                        "old_metadata": rec.metadata,
                        "metadata": new_meta,
                    }
                ]
            )
        return self.get(int(id))

    def delete(self, id: Union[int, Iterable[int]]) -> int:
        """Delete memories (an unknown id raises :class:`~engramdb.errors.NotFoundError`
        and deletes nothing). Returns how many were deleted."""
        ids = [int(id)] if isinstance(id, (int, np.integer)) else [int(i) for i in id]
        if not ids:
            return 0
        with self._lock:
            recs = self._records(ids)  # raises NotFoundError before anything changes
            n = self._store.delete(ids)
            for i in ids:
                self._bm25.remove(i)
            at = time.time()
            self._log(
                [
                    {
                        "id": int(r["id"]),
                        "event": "DELETE",
                        "at": at,
                        "old_text": r.get("text"),
                        "old_metadata": _item(r).metadata,
                    }
                    for r in recs
                ]
            )
        return n

    def delete_all(
        self,
        *,
        user_id: Optional[str] = None,
        agent_id: Optional[str] = None,
        session_id: Optional[str] = None,
        filters: Optional[dict[str, Any]] = None,
    ) -> int:
        """Delete every memory of a scope (and matching ``filters``, when given).
        At least one of them is required; :meth:`reset` empties everything."""
        if user_id is None and agent_id is None and session_id is None and filters is None:
            raise InvalidArgumentError(
                "delete_all needs user_id, agent_id, session_id or filters; use reset() to delete everything"
            )
        with self._lock:
            ids = [
                m.id
                for m in self.get_all(
                    user_id=user_id,
                    agent_id=agent_id,
                    session_id=session_id,
                    filters=filters,
                    include_archived=True,
                )
            ]
            return self.delete(ids) if ids else 0

    def reset(self) -> int:
        """Delete every memory (history is kept). Returns how many."""
        with self._lock:
            ids = [int(i) for i in self._store.ids()]
            return self.delete(ids) if ids else 0

    def link(self, a: int, b: int, kind: str = "related", weight: float = 1.0) -> None:
        """Link two memories both ways (typed and weighted)."""
        with self._lock:
            self._store.link(int(a), int(b), kind=kind, weight=weight)

    def unlink(self, a: int, b: int) -> None:
        with self._lock:
            self._store.unlink(int(a), int(b))

    def links(self, id: int) -> list[tuple[int, str, float]]:
        with self._lock.read():
            return [(int(t), str(k), float(w)) for t, k, w in self._store.links(int(id))]

    def forget(
        self,
        threshold: float = 0.05,
        *,
        now: TimeLike = None,
        action: str = "archive",
        dry_run: bool = False,
        filters: Optional[dict[str, Any]] = None,
        user_id: Optional[str] = None,
        agent_id: Optional[str] = None,
        session_id: Optional[str] = None,
    ) -> dict[str, Any]:
        """Archive (or delete) memories whose retention fell below ``threshold``;
        returns the store's report. Archived memories leave searches unless
        ``include_archived=True``; nothing is removed silently (see the report and
        :meth:`history`)."""
        with self._lock:
            report = self._store.forget(
                threshold=threshold,
                now=to_epoch(now),
                action=action,
                dry_run=dry_run,
                filter=filters,
                user_id=user_id,
                agent_id=agent_id,
                session_id=session_id,
            )
            if not dry_run:
                self._sync_after_forget(report, action)
        return report

    def _sync_after_forget(self, report: dict[str, Any], action: str) -> None:
        affected = report.get("ids")
        if affected is None:
            affected = list(report.get("archived", []) or []) + list(report.get("deleted", []) or [])
        affected = [int(i) for i in affected]
        live = set(int(i) for i in self._store.ids())
        at = time.time()
        events = []
        for i in affected:
            if i not in live:
                self._bm25.remove(i)
            else:
                self._bm25.set_archived(i, True)
            events.append({"id": i, "event": "FORGET", "at": at, "action": action})
        # anything else out of step (a report without ids): reconcile with the store
        stale = self._bm25.ids() - live
        for i in stale:
            self._bm25.remove(i)
        self._log(events)

    # -- reading ------------------------------------------------------------------
    def get(self, id: int) -> MemoryItem:
        """The memory ``id``; :class:`~engramdb.errors.NotFoundError` if there is none."""
        with self._lock.read():
            return _item(self._records([int(id)])[0])

    def get_all(
        self,
        *,
        user_id: Optional[str] = None,
        agent_id: Optional[str] = None,
        session_id: Optional[str] = None,
        filters: Optional[dict[str, Any]] = None,
        include_archived: bool = False,
        limit: Optional[int] = None,
    ) -> list[MemoryItem]:
        """Every memory of a scope (all when no scope is given) matching ``filters``,
        oldest first (by creation time, then id). An unknown scope gives ``[]``."""
        with self._lock.read():
            ids = self._store.ids(
                filters,
                user_id=user_id,
                agent_id=agent_id,
                session_id=session_id,
                include_archived=include_archived,
            )
            out = [_item(d) for d in self._records(ids.tolist())]
        out.sort(key=lambda m: (m.created_at, m.id))
        return out[:limit] if limit is not None else out

    def search(
        self,
        query: Union[None, str, bytes],
        k: int = 10,
        *,
        filters: Optional[dict[str, Any]] = None,
        user_id: Optional[str] = None,
        agent_id: Optional[str] = None,
        session_id: Optional[str] = None,
        now: TimeLike = None,
        mode: str = "hybrid",
        fusion: str = "sum",
        decay: bool = True,
        weights: tuple[float, float, float] = (1.0, 0.3, 0.2),
        expand_links: int = 0,
        link_discount: float = 0.8,
        link_kinds: Optional[Iterable[str]] = None,
        reinforce: bool = False,
        include_archived: bool = False,
        candidates: Optional[int] = None,
        rrf_k: int = 60,
        alpha: float = 0.5,
        min_score: Optional[float] = None,
        query_vector: Any = None,
    ) -> list[MemoryHit]:
        """The ``k`` best memories for ``query``, best first (see the module docstring
        for the score). ``mode``: ``"hybrid"`` (default), ``"vector"`` or ``"keyword"``;
        ``fusion``: ``"sum"`` (default: ``alpha`` x min-max similarity + (1 - alpha) x
        min-max BM25, over each retriever's candidates) or ``"rrf"`` (1 / (rrf_k + rank)
        summed, scaled so rank 1 in both lists is 1). On LoCoMo (benches/RESULTS.md)
        "sum" beat "rrf": the weaker retriever's ranks count as much as the stronger's
        under RRF. ``query_vector`` replaces the query's embedding (for embedders
        with a separate query side); with it ``query`` may be ``None`` in vector mode.
        ``candidates`` is how many each retriever contributes (default
        ``max(50, 5k)``). ``link_kinds`` restricts link expansion to those kinds
        (e.g. ``{"similar"}``; default all). ``reinforce=True`` counts the returned memories as recalled
        (strength + 1, last access = ``now``: the forgetting curve restarts).
        """
        if mode not in ("hybrid", "vector", "keyword"):
            raise InvalidArgumentError(f"mode must be 'hybrid', 'vector' or 'keyword', got {mode!r}")
        if fusion not in ("rrf", "sum"):
            raise InvalidArgumentError(f"fusion must be 'rrf' or 'sum', got {fusion!r}")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise InvalidArgumentError(f"k must be a positive integer, got {k!r}")
        if filters is not None and not isinstance(filters, dict):
            raise InvalidArgumentError("filters must be a dict")
        if len(weights) != 3:
            raise InvalidArgumentError("weights must be (relevance, retention, importance)")
        if query is None:
            if query_vector is None or mode != "vector":
                raise InvalidArgumentError("search needs a query text (or query_vector= with mode='vector')")
            q = ""
        else:
            q = _clean_texts([query])[0]
        t_now = to_epoch(now)
        n_cand = int(candidates) if candidates is not None else max(50, 5 * int(k))
        scope = {"user_id": user_id, "agent_id": agent_id, "session_id": session_id}
        qv: Optional[np.ndarray] = None
        sims: dict[int, float] = {}

        if mode != "keyword":
            if query_vector is not None:
                qv = np.asarray(query_vector, dtype=np.float32).reshape(-1)
                if qv.shape[0] != self.dim:
                    raise DimensionMismatchError(
                        f"query_vector has dim {qv.shape[0]}, the memory has {self.dim}"
                    )
            else:
                qv = self._embed([q])[0]
            qv = qv / max(float(np.linalg.norm(qv)), 1e-12)

        def ranked() -> list[MemoryHit]:
            # every native read of one search, under the memory's shared lock
            kw: dict[int, float] = {}
            if qv is not None:
                if len(self._store) and mode == "vector" and decay and hasattr(self._store, "recall"):
                    # vector mode with decay: the store's exact top-k under the three-part
                    # score, so a fresh or important memory is not lost behind similar stale
                    # ones. Hybrid pools stay pure similarity (as the BM25 pool is pure BM25)
                    # and take the fast plain search.
                    for h in self._store.recall(
                        qv,
                        k=n_cand,
                        filter=filters,
                        include_archived=include_archived,
                        now=t_now,
                        decay=decay,
                        weights=tuple(weights),
                        reinforce=False,
                        **scope,
                    ):
                        if not h.expanded:
                            sims[int(h.id)] = float(h.similarity)
                elif len(self._store):
                    ids, scores = self._store.search(
                        qv, k=n_cand, filter=filters, include_archived=include_archived, **scope
                    )
                    for i, s in zip(ids.tolist(), scores.tolist()):
                        if i != MISSING_ID:
                            sims[int(i)] = float(s)
            if mode != "vector":
                # the store evaluates the filter (one grammar, in the core),
                # lazily, on the keyword candidates in score order
                def accept(i: int) -> bool:
                    return bool(self._visible([i], filters, scope, include_archived))

                kw = dict(
                    self._bm25.search(
                        q,
                        n_cand,
                        include_archived=include_archived,
                        accept=None if filters is None else accept,
                        **scope,
                    )
                )

            # relevance in [0, 1]
            if mode == "vector":
                rel = dict(sims)
            elif mode == "keyword":
                top = max(kw.values(), default=1.0) or 1.0
                rel = {i: s / top for i, s in kw.items()}
            elif fusion == "rrf":
                rel = {}
                for lst in (sims, kw):
                    for r, i in enumerate(sorted(lst, key=lambda x: (-lst[x], x))):
                        rel[i] = rel.get(i, 0.0) + 1.0 / (rrf_k + r + 1)
                scale = 2.0 / (rrf_k + 1)
                rel = {i: v / scale for i, v in rel.items()}
            else:
                ns, nk = _minmax(sims), _minmax(kw)
                rel = {i: alpha * ns.get(i, 0.0) + (1 - alpha) * nk.get(i, 0.0) for i in set(ns) | set(kw)}
            if not rel:
                return []

            hits = self._score(rel, sims, kw, qv, t_now, decay, weights)
            if expand_links > 0:
                hits = self._expand(
                    hits,
                    int(k),
                    expand_links,
                    link_discount,
                    None if link_kinds is None else set(link_kinds),
                    filters,
                    scope,
                    include_archived,
                    qv,
                    t_now,
                    decay,
                    weights,
                )
            hits.sort(key=lambda h: (-h.score, h.id))
            hits = hits[: int(k)]
            if min_score is not None:
                hits = [h for h in hits if h.score >= min_score]
            if hits and qv is not None:
                self._fill_similarity(hits, qv)
            return hits

        with self._lock.read():
            hits = ranked()
        if reinforce and hits:
            self._reinforce([h.id for h in hits], t_now)
        return hits

    def _retention(self, ids: list[int], recs: list[dict[str, Any]], now: Optional[float]) -> list[float]:
        if hasattr(self._store, "retention"):
            return [float(x) for x in self._store.retention(ids, now=now)]
        t = time.time() if now is None else now
        return [
            math.exp(-max(0.0, t - float(r["last_access"])) / 86400.0 / max(float(r["strength"]), 1e-9))
            for r in recs
        ]

    def _score(self, rel, sims, kw, qv, now, decay, weights) -> list[MemoryHit]:  # type: ignore[no-untyped-def]
        ids = list(rel)
        recs = self._records(ids)
        ret = self._retention(ids, recs, now)
        w0, w1, w2 = (float(w) for w in weights)
        hits = []
        for i, d, r in zip(ids, recs, ret):
            it = _item(d)
            score = w0 * rel[i] + (w1 * r if decay else 0.0) + w2 * it.importance
            hits.append(
                MemoryHit(
                    id=i,
                    text=it.text,
                    score=score,
                    similarity=sims.get(i, math.nan),
                    retention=r,
                    importance=it.importance,
                    metadata=it.metadata,
                    created_at=it.created_at,
                    links=it.links,
                    user_id=it.user_id,
                    agent_id=it.agent_id,
                    session_id=it.session_id,
                    keyword=kw.get(i),
                    relevance=rel[i],
                )
            )
        return hits

    def _expand(
        self, hits, k, hops, discount, kinds, filters, scope, include_archived, qv, now, decay, weights
    ):  # type: ignore[no-untyped-def]
        hits.sort(key=lambda h: (-h.score, h.id))
        by_id = {h.id: h for h in hits}
        frontier = hits[:k]
        for _ in range(hops):
            cand: dict[int, tuple[float, int]] = {}
            for h in frontier:
                for t, kind, w in h.links:
                    if kinds is not None and kind not in kinds:
                        continue
                    s = h.score * float(w) * discount
                    if t in by_id and by_id[t].score >= s:
                        continue
                    if t not in cand or cand[t][0] < s:
                        cand[t] = (s, h.id)
            if not cand:
                break
            ids = self._visible(list(cand), filters, scope, include_archived)
            recs = self._records(ids)
            ret = self._retention(ids, recs, now)
            nxt = []
            for t, d, r in zip(ids, recs, ret):
                it = _item(d)
                s, via = cand[t]
                old = by_id.get(t)
                if old is not None:
                    old.score, old.expanded, old.via = s, True, via
                    continue
                hit = MemoryHit(
                    id=t,
                    text=it.text,
                    score=s,
                    similarity=math.nan,
                    retention=r,
                    importance=it.importance,
                    metadata=it.metadata,
                    created_at=it.created_at,
                    links=it.links,
                    user_id=it.user_id,
                    agent_id=it.agent_id,
                    session_id=it.session_id,
                    expanded=True,
                    via=via,
                )
                by_id[t] = hit
                hits.append(hit)
                nxt.append(hit)
            frontier = nxt
        return hits

    def _visible(
        self, ids: list[int], filters: Optional[dict[str, Any]], scope: dict[str, Any], include_archived: bool
    ) -> list[int]:
        """Those of ``ids`` a search with these filters / scope may return, as
        the store evaluates them (only these records are looked at)."""
        return self._store.ids(filters, include_archived=include_archived, among=ids, **scope).tolist()

    def _fill_similarity(self, hits: list[MemoryHit], qv: np.ndarray) -> None:
        for h in hits:
            if math.isnan(h.similarity):
                v = self._store.get(h.id).vector
                h.similarity = float(np.dot(v, qv))

    def _reinforce(self, ids: list[int], now: Optional[float]) -> None:
        with self._lock:
            if hasattr(self._store, "reinforce"):
                self._store.reinforce(ids, now=now)
                return
            t = time.time() if now is None else now
            recs = self._records(ids)
            self._store._native.touch(
                [(int(r["id"]), t, float(r["strength"]) + 1.0, int(r["access_count"]) + 1) for r in recs]
            )

    # -- readers --------------------------------------------------------------------
    def reader(self, kind: str = "context", **kwargs: Any) -> Any:
        """An LLM-side reader over this memory: ``"context"`` (:class:`~engramdb.readers.ContextReader`)
        or ``"summary"`` (:class:`~engramdb.readers.SummaryReader`, needs ``llm=``)."""
        from .readers import ContextReader, SummaryReader

        if kind == "context":
            return ContextReader(self, **kwargs)
        if kind == "summary":
            return SummaryReader(self, **kwargs)
        raise InvalidArgumentError(f"unknown reader {kind!r}: expected 'context' or 'summary'")

    # -- bulk -------------------------------------------------------------------------
    def export_items(self, include_archived: bool = True) -> list[MemoryItem]:
        return self.get_all(include_archived=include_archived)

    def import_items(
        self, records: Sequence[dict[str, Any]], vectors: Sequence[Optional[np.ndarray]]
    ) -> list[int]:
        """Re-create exported memories (dicts as :meth:`MemoryItem.to_dict` gives) under
        their ids with every attribute: decay state, archived flag, times and links.
        ``vectors[i]`` is reused when given, else the text is embedded. Used by
        ``engramdb mem import``; an existing id is replaced."""
        items = [_item(d) for d in records]
        texts = _clean_texts([it.text for it in items])
        need = [i for i, v in enumerate(vectors) if v is None]
        vecs = np.empty((len(items), self.dim), dtype=np.float32)
        for s in range(0, len(need), 256):
            chunk = need[s : s + 256]
            vecs[chunk] = self._embed([texts[i] for i in chunk])
        for i, v in enumerate(vectors):
            if v is not None:
                vecs[i] = np.asarray(v, dtype=np.float32).reshape(-1)
        at = time.time()
        with self._lock:
            for s in range(0, len(items), 1024):
                sl = slice(s, s + 1024)
                part = items[sl]
                self._store.upsert(
                    vecs[sl],
                    ids=[it.id for it in part],
                    texts=texts[sl],
                    metadata=[it.metadata or None for it in part],
                    user_id=[it.user_id for it in part],
                    agent_id=[it.agent_id for it in part],
                    session_id=[it.session_id for it in part],
                    importance=[it.importance for it in part],
                    created_at=[it.created_at for it in part],
                )
            for it, t in zip(items, texts):
                self._bm25.add(it.id, t, (it.user_id, it.agent_id, it.session_id), it.archived)
            self._restore_state(items)
            self._log(
                [
                    {"id": it.id, "event": "IMPORT", "at": at, "text": it.text, "metadata": it.metadata}
                    for it in items
                ]
            )
        return [it.id for it in items]

    def _restore_state(self, items: list[MemoryItem]) -> None:
        """Set decay state, archived flags and times exactly as exported."""
        with self._lock:
            recs = []
            for it in items:
                d = it.to_dict()
                d["metadata"] = json.dumps(it.metadata, ensure_ascii=False) if it.metadata else None
                d["links"] = [tuple(x) for x in it.links]
                recs.append(d)
            for s in range(0, len(recs), 1024):
                self._store._native.patch(recs[s : s + 1024])
            for it in items:
                self._bm25.set_archived(it.id, it.archived)

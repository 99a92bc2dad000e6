"""A Mem0 vector-store backend on engramdb (``pip install "engramdb[mem0]"``).

    from engramdb.integrations.mem0 import register
    register()                                   # adds the "engramdb" provider to mem0
    from mem0 import Memory
    m = Memory.from_config({
        "vector_store": {"provider": "engramdb",
                         "config": {"path": "./mem0-store", "collection_name": "mem0",
                                    "embedding_model_dims": 384}},
        "embedder": {...}, "llm": {...},
    })

Mem0 has no plugin entry point for vector stores, so :func:`register` adds
``"engramdb"`` to ``mem0.utils.factory.VectorStoreFactory.provider_to_class`` and to
the provider table of ``mem0.vector_stores.configs.VectorStoreConfig`` (its config
class, :class:`EngramMem0Config`, is made importable as
``mem0.configs.vector_stores.engramdb``). It changes nothing else in Mem0.

Each collection is an :class:`engramdb.Memory` folder ``<path>/<collection_name>``.
A Mem0 record (string id, vector, payload dict) is stored as one memory: the
payload's ``"data"`` is the text (BM25-indexed, so :meth:`EngramMem0Store.keyword_search`
gives Mem0 its hybrid scoring), the payload is the metadata (plus the Mem0 id under
``"_mem0_id"``, removed again on the way out), and ``user_id`` / ``agent_id`` /
``run_id`` also become the record's engramdb scope. Search scores are cosine
similarities clipped at 0 (higher is better, in [0, 1]), as ``VectorStoreBase``
asks. Filters are Mem0's dicts; engramdb's filter grammar was modelled on them
(eq ne in nin gt gte lt lte contains, AND / OR / NOT, ``"*"`` meaning "any value").
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import types
from typing import Any, Optional

import numpy as np

try:
    from mem0.vector_stores.base import VectorStoreBase
    from pydantic import BaseModel, Field
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError("engramdb.integrations.mem0 needs mem0ai: pip install 'engramdb[mem0]'") from None

from ..errors import InvalidArgumentError
from ..memory import Memory

__all__ = ["EngramMem0Store", "EngramMem0Config", "OutputData", "register", "mem0_id_to_int"]

ID_KEY = "_mem0_id"
SCOPE_KEYS = (("user_id", "user_id"), ("agent_id", "agent_id"), ("run_id", "session_id"))


def mem0_id_to_int(id: Any) -> int:
    """The engramdb id of a Mem0 (string) id: a 63-bit blake2b hash."""
    return int.from_bytes(hashlib.blake2b(str(id).encode("utf-8"), digest_size=8).digest(), "little") >> 1


class EngramMem0Config(BaseModel):
    """Settings of the ``"engramdb"`` provider."""

    collection_name: str = Field("mem0", description="Collection (a memory folder under path)")
    path: Optional[str] = Field(None, description="Folder holding the collections")
    embedding_model_dims: int = Field(1536, description="Dimension of the embedding vectors")


class OutputData(BaseModel):
    id: Optional[str]
    score: Optional[float]
    payload: Optional[dict]


class _VectorsGiven:
    """Mem0 always hands over vectors; embedding text here would be a bug."""

    def __init__(self, dim: int, name: str) -> None:
        self.dim = int(dim)
        self.model_id = f"mem0:{name}"

    def __call__(self, texts: list[str]) -> np.ndarray:
        raise RuntimeError("the Mem0 backend stores the vectors Mem0 computes; it never embeds text")


def _translate(filters: Optional[dict[str, Any]]) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """Mem0 filters -> (engramdb scope arguments, engramdb metadata filter)."""
    if not filters:
        return {}, None
    scope: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for k, v in filters.items():
        key = k.upper() if k.upper() in ("AND", "OR", "NOT") else k
        if key in ("AND", "OR"):
            rest[key.lower()] = [_translate_plain(f) for f in v]
        elif key == "NOT":
            rest["not"] = _translate_plain(v[0] if isinstance(v, list) and len(v) == 1 else v)
        elif v == "*":
            rest[k] = {"nin": [None]}  # any value: the field exists and is not null
        else:
            scoped = dict(SCOPE_KEYS).get(k)
            if scoped is not None and isinstance(v, str):
                scope[scoped] = v
            rest[k] = v
    return scope, (rest or None)


def _translate_plain(f: Any) -> Any:
    if isinstance(f, list):
        return {"and": [_translate_plain(x) for x in f]}
    return _translate(f)[1] or {}


class EngramMem0Store(VectorStoreBase):
    """``mem0.vector_stores.base.VectorStoreBase`` on an engramdb memory folder."""

    def __init__(
        self,
        collection_name: str = "mem0",
        path: Optional[str] = None,
        embedding_model_dims: int = 1536,
        **_: Any,
    ) -> None:
        self.root = path or os.path.join(os.path.expanduser("~"), ".engramdb", "mem0")
        self.embedding_model_dims = int(embedding_model_dims)
        self.collection_name = collection_name
        self.memory: Optional[Memory] = None
        self.create_col(collection_name, self.embedding_model_dims)

    # -- collections ------------------------------------------------------------------
    def _folder(self, name: str) -> str:
        return os.path.join(self.root, name)

    def create_col(self, name: str, vector_size: Optional[int] = None, distance: str = "cosine") -> None:
        if distance not in (None, "cosine"):
            raise InvalidArgumentError(f"engramdb collections use cosine similarity, not {distance!r}")
        if self.memory is not None:
            self.memory.close()
        self.collection_name = name
        if vector_size is not None:
            self.embedding_model_dims = int(vector_size)
        self.memory = Memory(self._folder(name), embedder=_VectorsGiven(self.embedding_model_dims, name))

    def list_cols(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        return sorted(
            d for d in os.listdir(self.root) if os.path.isfile(os.path.join(self.root, d, "memory.json"))
        )

    def delete_col(self) -> None:
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        shutil.rmtree(self._folder(self.collection_name), ignore_errors=True)

    def col_info(self) -> dict[str, Any]:
        m = self._mem()
        return {
            "name": self.collection_name,
            "path": str(m.path),
            "count": len(m),
            "dim": m.dim,
            "distance": "cosine",
        }

    def reset(self) -> None:
        self.delete_col()
        self.create_col(self.collection_name, self.embedding_model_dims)

    def _mem(self) -> Memory:
        if self.memory is None:
            self.create_col(self.collection_name, self.embedding_model_dims)
        assert self.memory is not None
        return self.memory

    # -- records ------------------------------------------------------------------------
    @staticmethod
    def _split(payload: Optional[dict[str, Any]]) -> tuple[str, dict[str, Any], dict[str, Any]]:
        p = dict(payload or {})
        text = p.get("data")
        if not isinstance(text, str) or not text.strip():
            text = "(no text)"
        scope = {ours: p[theirs] for theirs, ours in SCOPE_KEYS if isinstance(p.get(theirs), str)}
        return text, p, scope

    def _out(self, text: str, metadata: dict[str, Any], score: Optional[float]) -> OutputData:
        meta = dict(metadata or {})
        mid = meta.pop(ID_KEY, None)
        return OutputData(id=mid, score=score, payload=meta)

    def insert(
        self, vectors: Any, payloads: Optional[list[dict]] = None, ids: Optional[list[str]] = None
    ) -> None:
        vecs = np.asarray(vectors, dtype=np.float32)
        if vecs.ndim == 1:
            vecs = vecs.reshape(1, -1)
        n = vecs.shape[0]
        payloads = list(payloads) if payloads is not None else [{} for _ in range(n)]
        if ids is None:
            import uuid

            ids = [str(uuid.uuid4()) for _ in range(n)]
        if len(payloads) != n or len(ids) != n:
            raise InvalidArgumentError("vectors, payloads and ids must have the same length")
        m = self._mem()
        for v, p, i in zip(vecs, payloads, ids):  # scope can differ per record
            text, meta, scope = self._split(p)
            meta[ID_KEY] = str(i)
            m.upsert([mem0_id_to_int(i)], [text], vectors=v.reshape(1, -1), metadata=[meta], **scope)

    def search(
        self, query: str, vectors: Any, top_k: int = 5, filters: Optional[dict] = None
    ) -> list[OutputData]:
        m = self._mem()
        if len(m) == 0:
            return []
        scope, flt = _translate(filters)
        qv = np.asarray(vectors, dtype=np.float32).reshape(-1)
        hits = m.search(
            None,
            k=int(top_k),
            filters=flt,
            mode="vector",
            decay=False,
            weights=(1.0, 0.0, 0.0),
            query_vector=qv,
            **scope,
        )
        return [self._out(h.text, h.metadata, max(0.0, float(h.similarity))) for h in hits]

    def keyword_search(
        self, query: str, top_k: int = 5, filters: Optional[dict] = None
    ) -> Optional[list[OutputData]]:
        """BM25 over the stored texts (Mem0 normalises the raw scores itself)."""
        m = self._mem()
        if not query or not str(query).strip():
            return []
        scope, flt = _translate(filters)
        hits = m.search(str(query), k=int(top_k), filters=flt, mode="keyword", decay=False, **scope)
        return [self._out(h.text, h.metadata, float(h.keyword or 0.0)) for h in hits]

    def delete(self, vector_id: str) -> None:
        m = self._mem()
        i = mem0_id_to_int(vector_id)
        if i in m:
            m.delete(i)

    def update(self, vector_id: str, vector: Any = None, payload: Optional[dict] = None) -> None:
        m = self._mem()
        i = mem0_id_to_int(vector_id)
        if i not in m:
            raise KeyError(f"no memory {vector_id!r}")
        old = m.get(i)
        vec = m.vector(i) if vector is None else np.asarray(vector, dtype=np.float32)
        if payload is None:
            payload = {k: v for k, v in old.metadata.items() if k != ID_KEY}
        text, meta, scope = self._split(payload)
        meta[ID_KEY] = str(vector_id)
        m.upsert([i], [text], vectors=vec.reshape(1, -1), metadata=[meta], **scope)

    def get(self, vector_id: str) -> Optional[OutputData]:
        m = self._mem()
        i = mem0_id_to_int(vector_id)
        if i not in m:
            return None
        it = m.get(i)
        if it.metadata.get(ID_KEY) != str(vector_id):
            return None
        return self._out(it.text, it.metadata, None)

    def list(self, filters: Optional[dict] = None, top_k: Optional[int] = None) -> list[list[OutputData]]:
        """``[[records...]]`` (Mem0 unwraps one level), oldest first."""
        m = self._mem()
        scope, flt = _translate(filters)
        items = m.get_all(filters=flt, limit=top_k, **scope)
        return [[self._out(it.text, it.metadata, None) for it in items]]


def register() -> None:
    """Make ``"engramdb"`` a Mem0 vector-store provider (idempotent)."""
    from mem0.utils.factory import VectorStoreFactory
    from mem0.vector_stores.configs import VectorStoreConfig

    VectorStoreFactory.provider_to_class["engramdb"] = "engramdb.integrations.mem0.EngramMem0Store"
    modname = "mem0.configs.vector_stores.engramdb"
    if modname not in sys.modules:
        mod = types.ModuleType(modname)
        mod.EngramMem0Config = EngramMem0Config  # type: ignore[attr-defined]
        sys.modules[modname] = mod
    private = getattr(VectorStoreConfig, "__private_attributes__", {}).get("_provider_configs")
    table = getattr(private, "default", None)
    if table is None:
        table = VectorStoreConfig._provider_configs  # type: ignore[attr-defined]
    table["engramdb"] = "EngramMem0Config"

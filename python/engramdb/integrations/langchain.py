"""A LangChain ``VectorStore`` over an engramdb memory folder.

    pip install "engramdb[langchain]"

    from engramdb.integrations.langchain import EngramVectorStore
    store = EngramVectorStore(embedding=my_langchain_embeddings, path="./lc-memory")
    store.add_documents(docs)
    store.similarity_search("query", k=4, filter={"topic": "food"})

Documents become memories of an :class:`engramdb.Memory`: ``page_content`` is the text,
``metadata`` the metadata (filters use engramdb's grammar: eq ne in nin gt gte lt lte
contains, and / or / not). LangChain ids are strings; each is kept in the memory's
metadata under ``"_lc_id"`` (removed again from returned documents) and mapped to a
64-bit engramdb id by a hash (blake2b, 63 bits), so adding with an existing id
replaces that document. Queries use ``embedding.embed_query`` and documents
``embed_documents``.

``similarity_search`` is pure vector search by default (``search_mode="vector"``,
no decay), as LangChain expects; ``search_mode="hybrid"`` adds engramdb's BM25 fusion.
Scores of ``similarity_search_with_score`` are cosine similarities (higher is closer).
``user_id`` / ``agent_id`` / ``session_id`` scope every operation of one store object.
``path=None`` keeps the memory in a temporary folder removed on :meth:`close`.

LangChain is imported only by this module (an optional extra).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Callable, Optional

import numpy as np

try:
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.vectorstores import VectorStore
    from langchain_core.vectorstores.utils import maximal_marginal_relevance
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "engramdb.integrations.langchain needs langchain-core: pip install 'engramdb[langchain]'"
    ) from e

from ..memory import Memory

__all__ = ["EngramVectorStore", "lc_id_to_int"]

ID_KEY = "_lc_id"


def lc_id_to_int(id: str) -> int:
    """The engramdb id of a LangChain string id (63-bit blake2b hash)."""
    return int.from_bytes(hashlib.blake2b(str(id).encode("utf-8"), digest_size=8).digest(), "little") >> 1


class _QueryAware:
    """Adapts a LangChain ``Embeddings`` to engramdb's embedder protocol."""

    def __init__(self, emb: Embeddings, dim: Optional[int]) -> None:
        self.emb = emb
        self.model_id = f"langchain:{type(emb).__name__}"
        self._dim = dim

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = len(self.emb.embed_query("dimension probe"))
        return self._dim

    def __call__(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.emb.embed_documents(list(texts)), dtype=np.float32)


class EngramVectorStore(VectorStore):
    """LangChain ``VectorStore`` backed by :class:`engramdb.Memory` (see the module doc)."""

    def __init__(
        self,
        embedding: Embeddings,
        path: Optional[str] = None,
        *,
        user_id: Optional[str] = None,
        agent_id: Optional[str] = None,
        session_id: Optional[str] = None,
        search_mode: str = "vector",
        dim: Optional[int] = None,
    ) -> None:
        self._embedding = embedding
        self._tmp = None
        if path is None:
            self._tmp = tempfile.mkdtemp(prefix="engramdb-lc-")
            path = self._tmp
        self.memory = Memory(path, embedder=_QueryAware(embedding, dim))
        self.scope = {"user_id": user_id, "agent_id": agent_id, "session_id": session_id}
        self.search_mode = search_mode

    @property
    def embeddings(self) -> Embeddings:
        return self._embedding

    def close(self) -> None:
        self.memory.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # -- writing ------------------------------------------------------------------
    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: Optional[list[dict]] = None,
        *,
        ids: Optional[list[Optional[str]]] = None,
        **kwargs: Any,
    ) -> list[str]:
        texts = list(texts)
        if not texts:
            return []
        metadatas = list(metadatas) if metadatas is not None else [{} for _ in texts]
        ids_in = list(ids) if ids is not None else [None] * len(texts)
        if len(metadatas) != len(texts) or len(ids_in) != len(texts):
            raise ValueError("texts, metadatas and ids must have the same length")
        str_ids = [str(i) if i is not None else str(uuid.uuid4()) for i in ids_in]
        # the last occurrence of a repeated id wins, as a sequence of upserts would
        last = {sid: j for j, sid in enumerate(str_ids)}
        keep = sorted(last.values())
        metas = []
        for j in keep:
            m = dict(metadatas[j] or {})
            m[ID_KEY] = str_ids[j]
            metas.append(m)
        kept_texts = [texts[j] for j in keep]
        vecs = np.asarray(self._embedding.embed_documents(kept_texts), dtype=np.float32)
        self.memory.upsert(
            [lc_id_to_int(str_ids[j]) for j in keep], kept_texts, vectors=vecs, metadata=metas, **self.scope
        )
        return str_ids

    def delete(self, ids: Optional[list[str]] = None, **kwargs: Any) -> Optional[bool]:
        """Delete by LangChain id (unknown ids are ignored); ``ids=None`` deletes every
        document of this store's scope."""
        if ids is None:
            for m in self.memory.get_all(include_archived=True, **self.scope):
                self.memory.delete(m.id)
            return True
        present = [i for i in {lc_id_to_int(x) for x in ids} if i in self.memory]
        if present:
            self.memory.delete(present)
        return True

    # -- reading ------------------------------------------------------------------
    def _doc(self, text: str, metadata: dict[str, Any]) -> Document:
        meta = dict(metadata or {})
        lc_id = meta.pop(ID_KEY, None)
        return Document(page_content=text, metadata=meta, id=lc_id)

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        out = []
        for sid in ids:
            i = lc_id_to_int(sid)
            if i not in self.memory:
                continue
            it = self.memory.get(i)
            if it.metadata.get(ID_KEY) == str(sid):
                out.append(self._doc(it.text, it.metadata))
        return out

    def _search(
        self, query: Optional[str], k: int, filter: Optional[dict], vector: Optional[list[float]] = None
    ) -> list[Any]:
        mode = self.search_mode if query is not None else "vector"
        if vector is None and mode != "keyword":
            vector = self._embedding.embed_query(query)  # type: ignore[arg-type]
        return self.memory.search(
            query,
            k=k,
            filters=filter,
            mode=mode,
            decay=False,
            weights=(1.0, 0.0, 0.0),
            query_vector=vector,
            **self.scope,
        )

    def similarity_search_with_score(
        self, query: str, k: int = 4, filter: Optional[dict] = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        hits = self._search(query, k, filter)
        return [(self._doc(h.text, h.metadata), float(h.similarity)) for h in hits]

    def similarity_search(
        self, query: str, k: int = 4, filter: Optional[dict] = None, **kwargs: Any
    ) -> list[Document]:
        return [d for d, _ in self.similarity_search_with_score(query, k, filter, **kwargs)]

    def similarity_search_by_vector(
        self, embedding: list[float], k: int = 4, filter: Optional[dict] = None, **kwargs: Any
    ) -> list[Document]:
        hits = self._search(None, k, filter, vector=embedding)
        return [self._doc(h.text, h.metadata) for h in hits]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        # scores are cosine similarities already (higher is closer)
        return lambda s: s

    def max_marginal_relevance_search_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: Optional[dict] = None,
        **kwargs: Any,
    ) -> list[Document]:
        hits = self._search(None, fetch_k, filter, vector=embedding)
        if not hits:
            return []
        vecs = [self.memory.vector(h.id) for h in hits]
        picked = maximal_marginal_relevance(
            np.asarray(embedding, dtype=np.float32), vecs, lambda_mult=lambda_mult, k=k
        )
        return [self._doc(hits[i].text, hits[i].metadata) for i in picked]

    def max_marginal_relevance_search(
        self,
        query: str,
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        filter: Optional[dict] = None,
        **kwargs: Any,
    ) -> list[Document]:
        return self.max_marginal_relevance_search_by_vector(
            self._embedding.embed_query(query), k, fetch_k, lambda_mult, filter, **kwargs
        )

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: Optional[list[dict]] = None,
        *,
        ids: Optional[list[str]] = None,
        path: Optional[str] = None,
        **kwargs: Any,
    ) -> EngramVectorStore:
        store = cls(embedding, path, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store

"""Mem0: its Memory (infer=False: no LLM call) running on the engramdb backend, offline."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile

import numpy as np
import pytest

os.environ.setdefault("MEM0_TELEMETRY", "False")  # before mem0 is imported: no network
os.environ.setdefault("MEM0_DIR", tempfile.mkdtemp(prefix="mem0-home-"))  # not ~/.mem0
pytest.importorskip("mem0")

from mem0 import Memory as Mem0Memory  # noqa: E402
from mem0.embeddings.base import EmbeddingBase  # noqa: E402

from engramdb.integrations.mem0 import EngramMem0Store, mem0_id_to_int, register  # noqa: E402

DIM = 256


class FakeEmbedding(EmbeddingBase):
    """Deterministic bag-of-words vectors: texts sharing words are similar."""

    def __init__(self) -> None:
        self.config = None

    def embed(self, text, memory_action=None):  # type: ignore[no-untyped-def]
        v = np.full(DIM, 0.01)
        for w in re.findall(r"\w+", text.lower()):
            seed = int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "little")
            v = v + np.random.default_rng(seed).standard_normal(DIM)
        return (v / np.linalg.norm(v)).tolist()


@pytest.fixture
def mem0_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-offline-test")  # clients are built, never called
    register()
    m = Mem0Memory.from_config(
        {
            "vector_store": {
                "provider": "engramdb",
                "config": {
                    "path": str(tmp_path / "vs"),
                    "collection_name": "mem0",
                    "embedding_model_dims": DIM,
                },
            },
            "embedder": {"provider": "openai", "config": {"embedding_dims": DIM}},
            "llm": {"provider": "openai", "config": {"api_key": "sk-offline-test"}},
            "history_db_path": str(tmp_path / "history.db"),
        }
    )
    m.embedding_model = FakeEmbedding()  # offline embedder in place of the OpenAI one
    m.llm = None  # any LLM use would fail loudly: infer=False must not need it
    assert isinstance(m.vector_store, EngramMem0Store)
    yield m


def _texts(res):
    return [r["memory"] for r in res["results"]]


def test_mem0_memory_on_engramdb(mem0_memory, tmp_path):
    m = mem0_memory
    r1 = m.add("Caroline joined an LGBTQ support group", user_id="alice", infer=False)
    m.add("Melanie painted a sunrise over the lake", user_id="alice", infer=False, metadata={"topic": "art"})
    m.add([{"role": "user", "content": "I love pottery classes"}], user_id="bob", infer=False)
    mid = r1["results"][0]["id"]
    assert m.get(mid)["memory"] == "Caroline joined an LGBTQ support group"

    hits = m.search("support group", filters={"user_id": "alice"}, top_k=2)
    assert hits["results"][0]["memory"] == "Caroline joined an LGBTQ support group"
    assert all(0.0 <= h["score"] for h in hits["results"])
    assert "pottery" not in " ".join(
        _texts(m.search("pottery classes", filters={"user_id": "alice"}, top_k=5))
    )
    assert _texts(m.search("pottery classes", filters={"user_id": "bob"}, top_k=5)) == [
        "I love pottery classes"
    ]

    assert sorted(_texts(m.get_all(filters={"user_id": "alice"}))) == [
        "Caroline joined an LGBTQ support group",
        "Melanie painted a sunrise over the lake",
    ]
    m.update(mid, "Caroline joined a support group in May")
    assert m.get(mid)["memory"] == "Caroline joined a support group in May"
    events = [h["event"] for h in m.history(mid)]
    assert events[:2] == ["ADD", "UPDATE"]

    m.delete(mid)
    assert m.get(mid) is None
    assert _texts(m.get_all(filters={"user_id": "alice"})) == ["Melanie painted a sunrise over the lake"]
    m.delete_all(user_id="bob")
    assert m.get_all(filters={"user_id": "bob"})["results"] == []

    # the records live in an engramdb memory folder, scoped and BM25-indexed
    store = m.vector_store
    assert store.col_info()["count"] == 1 and "mem0" in store.list_cols()
    it = store.memory.get_all(user_id="alice")
    assert len(it) == 1 and it[0].metadata["topic"] == "art"


def test_backend_contract(tmp_path):
    s = EngramMem0Store(collection_name="c", path=str(tmp_path), embedding_model_dims=4)
    vecs = [[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]]
    s.insert(
        vecs,
        payloads=[
            {"data": "red apple", "user_id": "u", "n": 1},
            {"data": "green pear", "user_id": "u", "n": 2},
            {"data": "red pear", "user_id": "v", "n": 3},
        ],
        ids=["a", "b", "c"],
    )
    got = s.search("q", [1, 0, 0, 0], top_k=3)
    assert [o.id for o in got] == ["a", "c", "b"]
    assert got[0].score == pytest.approx(1.0) and got[2].score == 0.0  # similarity clipped at 0
    assert got[0].payload == {"data": "red apple", "user_id": "u", "n": 1}
    assert [o.id for o in s.search("q", [1, 0, 0, 0], top_k=3, filters={"user_id": "u"})] == ["a", "b"]
    assert [o.id for o in s.search("q", [1, 0, 0, 0], top_k=3, filters={"n": {"gte": 2}})] == ["c", "b"]
    assert [o.id for o in s.keyword_search("pear", top_k=5, filters={"user_id": "v"})] == ["c"]
    assert [o.id for o in s.list(filters={"user_id": "u"})[0]] == ["a", "b"]
    s.update("a", payload={"data": "red apple pie", "user_id": "u"})
    assert s.get("a").payload["data"] == "red apple pie"
    assert np.allclose(s.memory.store.get(mem0_id_to_int("a")).vector, [1, 0, 0, 0])
    s.update("a", vector=[0, 0, 1, 0])
    assert s.search("q", [0, 0, 1, 0], top_k=1)[0].id == "a"
    s.delete("a")
    s.delete("missing")  # no error
    assert s.get("a") is None
    s.reset()
    assert s.list()[0] == [] and s.col_info()["count"] == 0
    s.delete_col()
    assert "c" not in s.list_cols()

"""LangChain: the standard VectorStore suite of langchain-tests, plus engramdb specifics."""

from __future__ import annotations

import importlib.util
from collections.abc import Generator

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_tests")

from langchain_core.documents import Document  # noqa: E402
from langchain_core.vectorstores import VectorStore  # noqa: E402
from langchain_tests.integration_tests.vectorstores import VectorStoreIntegrationTests  # noqa: E402

from engramdb.integrations.langchain import EngramVectorStore, lc_id_to_int  # noqa: E402

HAS_PYTEST_ASYNCIO = importlib.util.find_spec("pytest_asyncio") is not None


class TestEngramVectorStoreStandard(VectorStoreIntegrationTests):
    # langchain-tests writes its async tests as bare ``async def`` (its own repos run
    # pytest-asyncio in auto mode): mark the class instead of changing the project's
    # pytest config, and silence pytest-asyncio's note about the class's sync tests.
    if HAS_PYTEST_ASYNCIO:
        pytestmark = [
            pytest.mark.asyncio,
            pytest.mark.filterwarnings("ignore:.*is marked with '@pytest.mark.asyncio':pytest.PytestWarning"),
        ]

    @pytest.fixture()
    def vectorstore(self, tmp_path) -> Generator[VectorStore, None, None]:  # type: ignore[override]
        store = EngramVectorStore(self.get_embeddings(), str(tmp_path / "lc"))
        try:
            yield store
        finally:
            store.close()

    if not HAS_PYTEST_ASYNCIO:

        @property
        def has_async(self) -> bool:  # the async half needs pytest-asyncio
            return False


def test_persistence_filters_scores_and_scope(tmp_path):
    emb = VectorStoreIntegrationTests.get_embeddings()
    path = str(tmp_path / "lc")
    s = EngramVectorStore.from_texts(
        ["apples are red", "bananas are yellow", "cherries are red"],
        emb,
        metadatas=[{"color": "red"}, {"color": "yellow"}, {"color": "red"}],
        ids=["a", "b", "c"],
        path=path,
        user_id="u1",
    )
    got = s.similarity_search("bananas are yellow", k=3, filter={"color": "red"})
    assert {d.id for d in got} == {"a", "c"} and all(d.metadata == {"color": "red"} for d in got)
    (doc, score), *_ = s.similarity_search_with_score("bananas are yellow", k=1)
    assert doc.id == "b" and score == pytest.approx(1.0, abs=1e-5)
    rel = s.similarity_search_with_relevance_scores("bananas are yellow", k=1)
    assert rel[0][1] == pytest.approx(1.0, abs=1e-5)
    mmr = s.max_marginal_relevance_search("apples are red", k=2, fetch_k=3)
    assert len(mmr) == 2 and mmr[0].id == "a"
    s.close()
    other = EngramVectorStore(emb, path, user_id="u2")
    assert other.similarity_search("apples", k=3) == []  # another scope
    other.close()
    again = EngramVectorStore(emb, path, user_id="u1")
    assert [d.page_content for d in again.get_by_ids(["b"])] == ["bananas are yellow"]
    assert again.memory.get(lc_id_to_int("b")).metadata["_lc_id"] == "b"
    again.search_mode = "hybrid"
    assert again.similarity_search("cherries", k=1)[0].id == "c"  # the keyword side finds it
    again.delete()
    assert again.similarity_search("apples", k=3) == []
    again.close()


def test_documents_with_own_ids(tmp_path):
    s = EngramVectorStore(VectorStoreIntegrationTests.get_embeddings(), str(tmp_path / "x"))
    ids = s.add_documents([Document(page_content="x", id="custom"), Document(page_content="y")])
    assert ids[0] == "custom" and len(ids[1]) == 36
    assert s.get_by_ids(["custom"])[0].page_content == "x"
    s.close()

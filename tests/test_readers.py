"""LLM-side readers: ContextReader packing and SummaryReader's rolling summary."""

from __future__ import annotations

import re

import pytest
from test_memory import T0, HashEmbedder

from engramdb.errors import InvalidArgumentError
from engramdb.memory import Memory
from engramdb.readers import Context, ContextReader, SummaryReader, approx_tokens, as_token_counter

DAY = 86400.0


@pytest.fixture
def mem(tmp_path):
    m = Memory(tmp_path / "mem", embedder=HashEmbedder())
    m.add(
        [
            "Caroline went to an LGBTQ support group",
            "Caroline is researching adoption agencies",
            "Melanie painted a lake sunrise",
            "Melanie took her kids camping in the forest",
            "Caroline wants to become a counselor",
        ],
        user_id="conv",
        timestamp=[T0 + i * DAY for i in range(5)],
    )
    m.add("Caroline's private note for another user", user_id="other")
    yield m
    m.close()


def cited(ctx: str) -> list[int]:
    return [int(x) for x in re.findall(r"^\[(\d+)\]", ctx, re.M)]


def test_context_cites_ids_and_respects_budget(mem):
    r = mem.reader(k=10, expand_links=0)
    for budget in (10, 30, 60, 200, 2000):
        ctx = r.context("What does Caroline care about?", budget_tokens=budget, user_id="conv")
        assert isinstance(ctx, Context) and isinstance(ctx, str)
        assert ctx.tokens == approx_tokens(ctx) <= budget
        assert cited(ctx) == ctx.ids
        assert all(mem.get(i).user_id == "conv" for i in ctx.ids)
    big = r.context("What does Caroline care about?", budget_tokens=2000, user_id="conv")
    assert len(big.ids) == 5 and big.startswith("Relevant memories")
    assert "(2023-11-14)" in big  # dates shown
    # ranked: the first cited memory is the best search hit
    assert big.ids[0] == mem.search("What does Caroline care about?", k=1, user_id="conv")[0].id
    small = r.context("What does Caroline care about?", budget_tokens=30, user_id="conv")
    assert 0 < len(small.ids) < 5
    assert r.context("anything", budget_tokens=5, user_id="conv") == ""  # nothing fits


def test_context_unknown_scope_is_empty(mem):
    ctx = mem.reader().context("Caroline", budget_tokens=500, user_id="nobody")
    assert ctx == "" and ctx.ids == [] and ctx.tokens == 0


def test_context_drops_near_duplicates(mem):
    a = mem.add("Melanie loves pottery class", user_id="dup")
    b = mem.add("melanie  loves POTTERY class", user_id="dup")  # same text up to case/space
    d = mem.add("Melanie loves pottery class!", user_id="dup")  # same words: cosine 1 under the hash embedder
    c = mem.add("Melanie also plays the violin", user_id="dup")
    ctx = mem.reader(expand_links=0).context("Melanie pottery violin", budget_tokens=500, user_id="dup")
    assert len(ctx.ids) == 2 and c in ctx.ids and len({a, b, d} & set(ctx.ids)) == 1
    keep_all = mem.reader(expand_links=0, dedupe_threshold=1.01).context(
        "Melanie pottery violin", budget_tokens=500, user_id="dup"
    )
    assert len(keep_all.ids) == 3  # exact-text duplicates still go


def test_pluggable_token_counter(mem):
    words = as_token_counter(lambda s: len(s.split()))
    assert words("a b c") == 3

    class Enc:
        def encode(self, s):
            return list(s)

    assert as_token_counter(Enc())("abcd") == 4
    with pytest.raises(InvalidArgumentError):
        as_token_counter(42)
    r = ContextReader(mem, token_counter=lambda s: len(s.split()), expand_links=0)
    ctx = r.context("Caroline", budget_tokens=25, user_id="conv")
    assert 0 < len(ctx.split()) <= 25 and ctx.tokens == len(ctx.split())
    with pytest.raises(InvalidArgumentError):
        r.context("Caroline", budget_tokens=0)


def test_reader_reinforces_only_when_asked(mem):
    ids = [m.id for m in mem.get_all(user_id="conv")]
    mem.reader(expand_links=0).context("Caroline", budget_tokens=500, user_id="conv", now=T0 + 10 * DAY)
    assert all(mem.get(i).access_count == 0 for i in ids)
    ctx = mem.reader(expand_links=0, reinforce=True).context(
        "Caroline", budget_tokens=500, user_id="conv", now=T0 + 10 * DAY
    )
    assert ctx.ids and all(mem.get(i).access_count == 1 for i in ctx.ids)
    assert all(mem.get(i).access_count == 0 for i in set(ids) - set(ctx.ids))


def test_summary_reader_rolls_a_summary_with_the_llm(mem, tmp_path):
    prompts: list[str] = []

    def llm(prompt: str) -> str:
        prompts.append(prompt)
        new = prompt.split("New messages:\n", 1)[1].split("\n\nUpdated summary:")[0]
        old = prompt.split("Current summary:\n", 1)[1].split("\n\nNew messages:")[0]
        return ("" if old == "(empty)" else old + " | ") + new.replace("\n", " / ")

    sr = mem.reader("summary", llm=llm, max_summary_tokens=40, expand_links=0)
    s1 = sr.observe([{"role": "user", "content": "I adopted a cat named Miso"}], user_id="u1")
    assert s1 == "user: I adopted a cat named Miso"
    s2 = sr.observe("The cat likes tuna", user_id="u1")
    assert s2.startswith("user: I adopted a cat named Miso | The cat likes tuna")
    assert "I adopted a cat named Miso" in prompts[1]  # the old summary is fed back
    assert len(mem.get_all(user_id="u1")) == 2  # messages went to vector memory too
    assert sr.summary(user_id="u2") == ""
    # the summary is capped at its budget
    long = sr.observe(" ".join(f"fact{i}" for i in range(200)), user_id="u1", add=False)
    assert approx_tokens(long) <= 40
    # persisted beside the memory
    sr2 = SummaryReader(mem, llm=llm)
    assert sr2.summary(user_id="u1") == long
    ctx = sr2.context("cat", budget_tokens=120, user_id="u1")
    assert ctx.startswith("Summary so far: ") and ctx.tokens <= 120
    assert set(ctx.ids) <= {m.id for m in mem.get_all(user_id="u1")}


def test_summary_reader_keeps_old_summary_when_llm_fails(mem):
    def bad(prompt: str) -> str:
        raise RuntimeError("model down")

    sr = SummaryReader(mem, llm=lambda p: "first summary")
    sr.observe("hello", user_id="z", add=False)
    sr.llm = bad
    with pytest.raises(RuntimeError):
        sr.observe("more", user_id="z", add=False)
    assert sr.summary(user_id="z") == "first summary"
    with pytest.raises(InvalidArgumentError):
        SummaryReader(mem, llm=None)  # type: ignore[arg-type]

"""Issue 4 on the Store: forgetting curve, links, LSH, dedupe, scopes, filters."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

import engramdb
from engramdb import LshIndex, Store

DAY = 86_400.0
T0 = 1_700_000_000.0


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "s", dim=8)
    yield s
    s.close()


# ---------------------------------------------------------------- forgetting curve
@settings(max_examples=40, deadline=None)
@given(dt1=st.floats(0, 100), dt2=st.floats(0, 100), s1=st.floats(0.1, 50), s2=st.floats(0.1, 50))
def test_retention_falls_with_dt_and_rises_with_strength(tmp_path_factory, dt1, dt2, s1, s2):
    path = tmp_path_factory.mktemp("r") / "s"
    with Store(path, dim=4) as s:
        [a] = s.add(np.ones(4), now=T0)
        r1, r2 = s.retention([a, a], now=T0 + dt1 * DAY), s.retention([a], now=T0 + dt2 * DAY)
        assert r1[0] == pytest.approx(math.exp(-dt1), rel=1e-4, abs=1e-6)
        if dt1 < dt2:
            assert r1[0] >= r2[0]
        # strength: raise it by reinforcing without resetting the clock
        s.configure(reset_on_recall=False, reinforce_increment=s1)
        s.reinforce([a], now=T0)
        strong = s.retention([a], now=T0 + dt1 * DAY)[0]
        assert strong >= r1[0]
        assert strong == pytest.approx(math.exp(-dt1 / (1 + s1)), rel=1e-4, abs=1e-6)


def test_recall_reinforces_and_is_read_only_when_asked(store, rng):
    x = unit(rng, 3, 8)
    ids = store.add(x, now=T0)
    hits = store.recall(x[0], k=1, now=T0 + 2 * DAY, reinforce=False)
    assert hits[0].id == ids[0] and hits[0].retention == pytest.approx(math.exp(-2), rel=1e-4)
    assert store.get(int(ids[0])).access_count == 0
    store.recall(x[0], k=1, now=T0 + 2 * DAY)
    r = store.get(int(ids[0]))
    assert (r.access_count, r.strength, r.last_access) == (1, 2.0, T0 + 2 * DAY)
    # after the recall the memory starts fresh and fades at half the rate
    assert store.retention(int(ids[0]), now=T0 + 4 * DAY)[0] == pytest.approx(math.exp(-1), rel=1e-4)


def test_decayed_ranking_is_exact_top_k(store, rng):
    x = unit(rng, 400, 8)
    created = T0 - rng.uniform(0, 30, 400) * DAY
    imp = rng.uniform(0, 1, 400)
    store.add(x, created_at=list(created), importance=list(imp), now=T0)
    # last_access starts at creation time: use the store's own retention
    q = unit(rng, 1, 8)[0]
    w = (1.0, 0.3, 0.2)
    hits = store.recall(q, k=10, now=T0, weights=w, reinforce=False)
    ret = store.retention(range(400), now=T0)
    score = w[0] * (x @ q) + w[1] * ret + w[2] * imp
    want = np.argsort(-score)[:10]
    assert [h.id for h in hits] == want.tolist()
    np.testing.assert_allclose([h.score for h in hits], score[want], rtol=1e-4)


def test_forget_archives_then_deletes_with_reports(store, rng):
    x = unit(rng, 6, 8)
    ages = [0, 1, 2, 5, 10, 30]
    store.add(x, created_at=[T0 - a * DAY for a in ages], now=T0)
    # records' last access is their creation time
    dry = store.forget(threshold=0.05, now=T0, dry_run=True)
    assert dry["dry_run"] and dry["ids"] == [3, 4, 5] and len(store) == 6  # exp(-5) < 0.05 < exp(-2)
    assert not any(store.get(i).archived for i in range(6))
    rep = store.forget(threshold=0.05, now=T0)
    assert rep["action"] == "archive" and rep["ids"] == [3, 4, 5] and rep["examined"] == 6
    assert all(r < 0.05 for r in rep["retentions"])
    ids, _ = store.search(x[4], k=6)
    assert not {3, 4, 5} & set(ids.tolist()), "archived records leave searches"
    ids, _ = store.search(x[4], k=6, include_archived=True)
    assert ids[0] == 4
    gone = store.forget(threshold=0.05, now=T0, action="delete")
    assert gone["ids"] == [3, 4, 5] and len(store) == 3
    with pytest.raises(engramdb.InvalidArgumentError):
        store.forget(action="shred")


# ---------------------------------------------------------------- links
def test_links_symmetric_typed_weighted_and_cleaned_on_delete(store, rng):
    store.add(unit(rng, 4, 8))
    store.link(0, 1, "caused_by", 0.7)
    assert store.links(0) == [(1, "caused_by", pytest.approx(0.7))]
    assert store.links(1) == [(0, "caused_by", pytest.approx(0.7))]
    store.link(0, 2)
    assert store.unlink(0, 2) and not store.unlink(0, 2)
    store.delete([1])
    assert store.links(0) == []
    with pytest.raises(engramdb.NotFoundError):
        store.link(0, 99)
    with pytest.raises(engramdb.InvalidArgumentError):
        store.link(0, 0)


def test_auto_link_and_expand(store, rng):
    base = unit(rng, 1, 8)[0]
    near = base + 0.1 * unit(rng, 1, 8)[0]
    far = -base
    [a] = store.add(base, auto_link=True)
    [b] = store.add(near, auto_link=True, link_threshold=0.9)
    [c] = store.add(far, auto_link=True, link_threshold=0.9)
    assert [t for t, _, _ in store.links(int(b))] == [int(a)]
    assert [t for t, _, _ in store.links(int(a))] == [int(b)]
    assert store.links(int(c)) == []
    assert store.links(int(a))[0][1] == "similar"
    hits = store.recall(far, k=1, decay=False, expand_links=0)
    assert [h.id for h in hits] == [c]
    store.link(int(c), int(a), "mentions", 0.5)
    hits = store.recall(far, k=1, decay=False, expand_links=2)
    assert [h.id for h in hits][0] == c
    exp = {h.id: h for h in hits if h.expanded}
    assert set(exp) == {a, b} and exp[a].via == c and exp[b].via == a
    assert exp[a].score == pytest.approx(hits[0].score * 0.5 * 0.8, rel=1e-5)


def test_degree_cap(store, rng):
    store.configure(max_degree=3)
    store.add(unit(rng, 10, 8))
    for i in range(1, 10):
        store.link(0, i, weight=i / 10)
    assert sorted(t for t, _, _ in store.links(0)) == [7, 8, 9]
    for i in range(1, 7):
        assert store.links(i) == []


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["link", "unlink", "delete", "add"]), st.integers(0, 9), st.integers(0, 9)), max_size=40))
def test_link_symmetry_under_random_operations(tmp_path_factory, ops):
    rng = np.random.default_rng(0)
    with Store(tmp_path_factory.mktemp("l") / "s", dim=8) as s:
        s.configure(max_degree=3)
        s.add(unit(rng, 10, 8), ids=range(10), auto_link=True, link_threshold=-1.0, link_k=2)
        for op, a, b in ops:
            present = set(s.ids().tolist())
            if op == "link" and a != b and {a, b} <= present:
                s.link(a, b, weight=float(a + b))
            elif op == "unlink" and {a, b} <= present:
                s.unlink(a, b)
            elif op == "delete" and a in present:
                s.delete([a])
            elif op == "add" and a not in present:
                s.add(unit(rng, 1, 8), ids=[a], auto_link=True, link_threshold=-1.0)
        for i in s.ids().tolist():
            for t, kind, w in s.links(i):
                assert t != i and (i, kind, pytest.approx(w)) in [(x, k, pytest.approx(y)) for x, k, y in s.links(t)]
            assert len(s.links(i)) <= 3


# ---------------------------------------------------------------- dedupe and LSH
def test_dedupe_returns_existing_id_and_reinforces(store, rng):
    x = unit(rng, 20, 8)
    store.add(x, user_id="u", now=T0)
    dup = x[3] + 0.01 * unit(rng, 1, 8)[0]
    ids = store.add(np.stack([dup, unit(rng, 1, 8)[0]]), user_id="u", dedupe=0.95, now=T0 + DAY)
    assert ids[0] == 3 and ids[1] == 20 and len(store) == 21
    assert store.get(3).access_count == 1
    # another scope never dedupes against this one
    [other] = store.add(dup, user_id="v", dedupe=0.95)
    assert other == 21


def test_lsh_index_finds_neighbours_and_prunes(rng):
    x = unit(rng, 5000, 32)
    idx = LshIndex(dim=32, tables=16, bits=10, seed=1)
    idx.add(x)
    q = x[:50] + 0.2 * unit(rng, 50, 32)
    ids, scores = idx.search(q, k=1)
    assert (ids[:, 0] == np.arange(50)).mean() >= 0.9
    assert idx.last_candidates < 50 * 5000 / 4
    idx.delete([0])
    assert 0 not in idx.search(x[0], k=5)[0].tolist()
    with pytest.raises(engramdb.DimensionMismatchError):
        idx.search(np.ones(31))


# ---------------------------------------------------------------- scopes
@settings(max_examples=30, deadline=None)
@given(
    scopes=st.lists(st.tuples(st.sampled_from(["u1", "u2", "u3", None]), st.sampled_from(["a", "b", None])), min_size=1, max_size=60),
    q_user=st.sampled_from(["u1", "u2", "u3"]),
    q_agent=st.sampled_from(["a", "b", None]),
)
def test_no_search_crosses_scopes(tmp_path_factory, scopes, q_user, q_agent):
    rng = np.random.default_rng(len(scopes))
    x = unit(rng, len(scopes), 8)
    with Store(tmp_path_factory.mktemp("sc") / "s", dim=8) as s:
        s.add(x, user_id=[u for u, _ in scopes], agent_id=[a for _, a in scopes], auto_link=True, link_threshold=-1)
        allowed = {i for i, (u, a) in enumerate(scopes) if u == q_user and (q_agent is None or a == q_agent)}
        ids, _ = s.search(x, k=len(scopes), user_id=q_user, agent_id=q_agent)
        got = set(ids[ids != engramdb.MISSING_ID].tolist())
        assert got == allowed, "exactly the records of the scope, never fewer, never others"
        hits = s.recall(x[0], k=len(scopes), user_id=q_user, agent_id=q_agent, expand_links=2, reinforce=False)
        assert {h.id for h in hits} <= allowed


# ---------------------------------------------------------------- durability
def test_memory_state_survives_reopen(tmp_path, rng):
    path = tmp_path / "s"
    x = unit(rng, 5, 8)
    with Store(path, dim=8) as s:
        s.add(x, user_id="mel", importance=[0.1, 0.2, 0.3, 0.4, 0.5], now=T0, auto_link=True, link_threshold=-1.0)
        s.link(0, 4, "mentions", 0.3)
        s.recall(x[1], k=1, now=T0 + DAY)
        s.forget(threshold=0.9, now=T0 + 3 * DAY, user_id="mel")
        before = {i: s.get(i) for i in range(5)}
    for flush in (False, True):
        with Store(path) as s:
            for i in range(5):
                a, b = before[i], s.get(i)
                assert (a.user_id, a.importance, a.strength, a.access_count, a.last_access, a.archived) == (
                    b.user_id, b.importance, b.strength, b.access_count, b.last_access, b.archived)
                assert sorted(a.links) == sorted(b.links)
            if not flush:
                s.flush()


CHILD = r"""
import sys, numpy as np, engramdb
path, start = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(start)
s = engramdb.Store(path, dim=8, checkpoint_bytes=32 * 1024)
i = start
while True:
    v = rng.standard_normal((2, 8))
    s.add(v, ids=[i, i + 1], user_id="u%d" % (i % 3), importance=0.5, auto_link=True, link_threshold=-1.0)
    s.link(i, i + 1, "pair", 2.0)  # above any cosine weight: never evicted by the cap
    s.recall(v[0], k=2, user_id="u%d" % (i % 3))
    print(i, flush=True)
    i += 2
"""


def test_kill_mid_write_keeps_memory_state_consistent(tmp_path):
    path = tmp_path / "s"
    Store(path, dim=8).close()
    start = 0
    acked = set()
    for round_ in range(12):
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(start)], stdout=subprocess.PIPE, text=True)
        time.sleep(0.4 + 0.05 * round_)
        os.kill(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        for line in out.split():
            acked.add(int(line))
            start = max(start, int(line) + 2)
        start += 100
        engramdb.verify(path)
        with Store(path) as s:
            have = set(s.ids().tolist())
            assert {a for a in acked} <= have and {a + 1 for a in acked} <= have
            for a in acked:
                assert (a + 1, "pair", pytest.approx(2.0)) in s.links(a)
                assert s.get(a).user_id == "u%d" % (a % 3)
            for i in have:  # symmetry holds after every crash
                for t, _, _ in s.links(i):
                    assert i in [x for x, _, _ in s.links(t)]
    assert len(acked) > 10

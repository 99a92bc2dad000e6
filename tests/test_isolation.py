"""Isolation: fuzzed scopes and metadata filters.

Hypothesis draws records spread over user / agent / session scopes with
random metadata, links across scopes, and random filters in the whole
grammar of ``rust/core/src/memory/filter.rs`` (eq ne in nin gt gte lt lte
contains, and / or / not, ``$`` prefixes, upper-case combinators, dotted
paths, several keys per object, missing fields, bools next to numbers,
``1 == 1.0``). A pure-Python evaluator written from that grammar is the
oracle: a search returns exactly the records of its scope that match
(``k`` covers the store), ``Store.ids(filter, scope)`` lists exactly them,
a recall (with link expansion) and a forget report never go outside them,
and ``tests/filter_model.py`` (the oracle other tests use) agrees. The same checks run on a store
recovered after ``kill -9`` mid-writes, and after upserts that move records
between scopes, deletes, flush/compaction and reopening.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import hypothesis.strategies as st
import numpy as np
import pytest
from filter_model import matches_filter
from hypothesis import HealthCheck, given, settings

import engramdb
from engramdb import MISSING_ID, Store

DIM = 4
USERS = [None, "ann", "bob", "cy"]
AGENTS = [None, "a1", "a2"]
SESSIONS = [None, "s1", "s2"]
STRINGS = ["", "a", "ab", "b", "ba", "Oslo", "oslo"]
OPS = ["eq", "ne", "in", "nin", "gt", "gte", "lt", "lte", "contains"]

# -- strategies --------------------------------------------------------------
scalar = st.one_of(
    st.integers(-3, 3),
    st.sampled_from([0.5, 2.0, -1.5, 1.0]),
    st.sampled_from(STRINGS),
    st.booleans(),
    st.none(),
)
value = st.one_of(scalar, st.lists(scalar, max_size=3))
metadata = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "k": scalar,
            "s": st.sampled_from(STRINGS),
            "tags": st.lists(scalar, max_size=3),
            "p": st.one_of(st.fixed_dictionaries({}, optional={"city": scalar, "n": scalar}), scalar),
        },
    ),
)
FIELDS = ["k", "s", "tags", "p.city", "p.n", "p", "missing", "p.city.x"]


@st.composite
def leaf(draw) -> dict:
    field = draw(st.sampled_from(FIELDS))
    form = draw(st.integers(0, 3))
    if form == 0:  # shorthand equality (also with an object value that is not an operator map)
        v = draw(st.one_of(value, st.fixed_dictionaries({"city": scalar})))
        return {field: v}
    ops = draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=2, unique=True))
    cond = {}
    for op in ops:
        name = ("$" if draw(st.booleans()) else "") + op
        cond[name] = draw(st.lists(scalar, max_size=3)) if op in ("in", "nin") else draw(value)
    return {field: cond}


def combine(children):
    comb = st.sampled_from(["and", "or", "$and", "$or", "AND", "Or"])
    return st.one_of(
        st.tuples(comb, st.lists(children, max_size=3)).map(lambda t: {t[0]: t[1]}),
        st.tuples(st.sampled_from(["not", "$not", "NOT"]), children).map(lambda t: {t[0]: t[1]}),
        st.tuples(children, children).map(lambda t: {**t[0], **t[1]}),  # several keys: all hold
    )


filters = st.recursive(leaf(), combine, max_leaves=6)
scopes = st.tuples(st.sampled_from(USERS), st.sampled_from(AGENTS), st.sampled_from(SESSIONS))

# -- the oracle -------------------------------------------------------------
_MISSING = object()


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def jeq(a, b) -> bool:
    """JSON equality; numbers by value, bools are not numbers."""
    if _is_num(a) and _is_num(b):
        return float(a) == float(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(jeq(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(jeq(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def order(a, b) -> Optional[int]:
    if _is_num(a) and _is_num(b):
        return (float(a) > float(b)) - (float(a) < float(b))
    if isinstance(a, str) and isinstance(b, str):
        return (a > b) - (a < b)
    return None


def apply(op: str, have, want) -> bool:
    if op == "eq":
        return jeq(have, want)
    if op == "ne":
        return not jeq(have, want)
    if op == "in":
        return any(jeq(have, w) for w in want)
    if op == "nin":
        return not any(jeq(have, w) for w in want)
    if op == "contains":
        if isinstance(have, str):
            return isinstance(want, str) and want in have
        return isinstance(have, list) and any(jeq(x, want) for x in have)
    o = order(have, want)
    return o is not None and {"gt": o > 0, "gte": o >= 0, "lt": o < 0, "lte": o <= 0}[op]


def strip(k: str) -> str:
    return k[1:] if k.startswith("$") else k


def evaluate(flt: dict, meta: Optional[dict]) -> bool:
    for key, val in flt.items():
        word = strip(key).lower()
        if word in ("and", "or"):
            parts = [evaluate(f, meta) for f in val]
            ok = all(parts) if word == "and" else any(parts)
        elif word == "not":
            ok = not evaluate(val, meta)
        else:
            cur: Any = meta
            for p in key.split("."):
                cur = cur[p] if isinstance(cur, dict) and p in cur else _MISSING
            if isinstance(val, dict) and val and all(strip(o) in OPS for o in val):
                conds = [(strip(o), w) for o, w in val.items()]
            else:
                conds = [("eq", val)]
            ok = all(op in ("ne", "nin") if cur is _MISSING else apply(op, cur, w) for op, w in conds)
        if not ok:
            return False
    return True


def in_scope(rec_scope, want) -> bool:
    return all(w is None or h == w for h, w in zip(rec_scope, want))


# -- building stores ---------------------------------------------------------
def rec_of(i: int) -> tuple[np.ndarray, tuple, Optional[dict]]:
    """A deterministic record for id ``i`` (used by the crash child and the parent)."""
    r = random.Random(i)
    v = np.array([r.randint(-4, 4) for _ in range(DIM)], dtype=np.float32)
    v[i % DIM] += 5
    scope = (r.choice(USERS), r.choice(AGENTS), r.choice(SESSIONS))
    meta = None if r.random() < 0.1 else {"k": r.randint(-3, 3), "s": r.choice(STRINGS),
                                          "tags": r.sample(STRINGS, r.randint(0, 2)),
                                          "p": {"city": r.choice(STRINGS)} if r.random() < 0.7 else r.randint(0, 2)}
    if meta is not None and r.random() < 0.3:
        meta["k"] = r.choice([True, False, 1.0, 2.5, "2"])
    return v, scope, meta


def add(s: Store, ids, vecs, scopes_, metas) -> None:
    s.add(np.stack(vecs), ids=list(ids), texts=[f"t{i}" for i in ids], metadata=list(metas),
          user_id=[sc[0] for sc in scopes_], agent_id=[sc[1] for sc in scopes_], session_id=[sc[2] for sc in scopes_])


def check(s: Store, model: dict[int, tuple], flt: Optional[dict], scope: tuple, q: np.ndarray,
          archived: frozenset = frozenset()) -> None:
    """model: id -> (scope, metadata). Archived ids are hidden from searches."""
    user, agent, session = scope
    sc = dict(user_id=user, agent_id=agent, session_id=session)
    in_sc = {i for i, (rs, _) in model.items() if in_scope(rs, scope)}
    want = {i for i in in_sc if flt is None or evaluate(flt, model[i][1])}
    if flt is not None:  # the other tests' oracle agrees with this one
        for i in in_sc:
            assert matches_filter(flt, model[i][1]) == (i in want), (flt, model[i][1])
    visible = want - archived
    assert sorted(s.ids(flt, **sc).tolist()) == sorted(want), "ids(filter, scope) differs from the oracle"
    assert sorted(s.ids(flt, include_archived=False, **sc).tolist()) == sorted(visible)
    n = len(model)
    ids, _ = s.search(q, k=max(1, n), filter=flt, **sc)
    got = {int(i) for i in ids if i != MISSING_ID}
    assert got == visible, f"search({flt}, {scope}): extra {got - visible}, missing {visible - got}"
    hits = s.recall(q, k=max(1, n), filter=flt, decay=False, reinforce=False, expand_links=2, **sc)
    assert {h.id for h in hits} == visible, "recall (with link expansion) left its scope or filter"
    hits = s.recall(q, k=2, filter=flt, decay=True, reinforce=False, expand_links=3, now=2e9, **sc)
    assert {h.id for h in hits} <= visible
    rep = s.forget(threshold=2.0, now=2e9, dry_run=True, filter=flt, **sc)
    assert set(rep["ids"]) == visible, "forget (dry run) would touch records outside its scope or filter"
    rep = s.forget(threshold=2.0, now=2e9, action="delete", dry_run=True, filter=flt, **sc)
    assert set(rep["ids"]) == want


SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@SETTINGS
@given(
    recs=st.lists(st.tuples(scopes, metadata), min_size=1, max_size=24),
    links=st.lists(st.tuples(st.integers(0, 23), st.integers(0, 23)), max_size=12),
    archive=st.sets(st.integers(0, 23), max_size=4),
    queries=st.lists(st.tuples(st.one_of(st.none(), filters), scopes), min_size=1, max_size=6),
    qv=st.lists(st.integers(-4, 4), min_size=DIM, max_size=DIM),
)
def test_search_recall_forget_stay_in_scope_and_filter(tmp_path_factory, recs, links, archive, queries, qv):
    path = tmp_path_factory.mktemp("iso") / "s"
    n = len(recs)
    with Store(path, dim=DIM, metric="l2") as s:
        add(s, range(n), [rec_of(i)[0] for i in range(n)], [r[0] for r in recs], [r[1] for r in recs])
        for a, b in links:  # links across scopes: expansion must not follow them out
            if a < n and b < n and a != b:
                s.link(a, b, "rel", 0.9)
        arch = frozenset(i for i in archive if i < n)
        if arch:  # archived records stay stored but leave searches
            recs_now = s._native.get_records(sorted(arch))
            for d in recs_now:
                d["archived"] = True
            s._native.patch(list(recs_now))
        model = {i: (recs[i][0], recs[i][1]) for i in range(n)}
        q = np.array(qv, dtype=np.float32)
        for flt, scope in queries:
            check(s, model, flt, scope, q, arch)


@settings(max_examples=300, deadline=None)
@given(flt=filters, meta=metadata)
def test_filter_grammar_matches_the_oracle(flt, meta):
    """tests/filter_model.py and this module's oracle agree on every filter."""
    assert matches_filter(flt, meta) == evaluate(flt, meta)


# -- after kill -9 and after compaction -----------------------------------------
CHILD = r"""
import sys, numpy as np, engramdb
sys.path.insert(0, sys.argv[3])
from test_isolation import rec_of, add
path, start = sys.argv[1], int(sys.argv[2])
s = engramdb.Store(path, dim=4, metric="l2", checkpoint_bytes=16 * 1024)
i = start
k = 0
print("ready", flush=True)
while True:
    n = 1 + (i * 7) % 13
    ids = list(range(i, i + n))
    rs = [rec_of(j) for j in ids]
    add(s, ids, [r[0] for r in rs], [r[1] for r in rs], [r[2] for r in rs])
    print(i, i + n, flush=True)
    i += n
    k += 1
    if k % 17 == 0:
        s.flush()
"""


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """A store written by children killed with SIGKILL mid-writes."""
    path = tmp_path_factory.mktemp("crash") / "s"
    Store(path, dim=DIM, metric="l2").close()
    acked: set[int] = set()
    start = 0
    rnd = random.Random(5)
    for _ in range(4):
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(start), str(Path(__file__).parent)],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"  # imports done: kill mid-writes
        time.sleep(rnd.uniform(0.2, 0.6))
        os.kill(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        for line in out.splitlines():
            if len(line.split()) != 2:
                continue  # a line cut by the kill
            lo, hi = map(int, line.split())
            acked.update(range(lo, hi))
            start = max(start, hi)
        start += 500
    engramdb.verify(path)
    with Store(path, read_only=True) as s:
        have = set(s.ids().tolist())
        assert acked <= have, "acknowledged records lost"
        model = {}
        for i in sorted(have):
            _, scope, meta = rec_of(i)
            r = s.get(i)
            assert (r.user_id, r.agent_id, r.session_id) == scope and r.metadata == meta, f"record {i} torn"
            model[i] = (scope, meta)
    assert len(model) >= 50
    return path, model


@pytest.fixture(scope="module")
def compacted(crashed, tmp_path_factory):
    """The crashed store, then: scopes moved by upserts, deletes, links, flushes, reopen."""
    import shutil

    src, model = crashed
    path = tmp_path_factory.mktemp("compact") / "s"
    shutil.copytree(src, path)
    model = dict(model)
    rnd = random.Random(9)
    with Store(path, checkpoint_bytes=4096) as s:
        ids = sorted(model)
        gone = rnd.sample(ids, len(ids) // 3)
        s.delete(gone)
        for i in gone:
            del model[i]
        s.flush()
        moved = rnd.sample(sorted(model), len(model) // 4)
        for i in moved:  # a record moved to another scope must leave the old one
            v, _, _ = rec_of(i)
            scope = (rnd.choice(USERS), rnd.choice(AGENTS), rnd.choice(SESSIONS))
            meta = {"k": rnd.randint(-3, 3), "moved": True}
            s.upsert(v, ids=[i], metadata=[meta], user_id=scope[0], agent_id=scope[1], session_id=scope[2])
            model[i] = (scope, meta)
        live = sorted(model)
        for _ in range(40):
            a, b = rnd.sample(live, 2)
            s.link(a, b, "x", 0.5)
        s.flush()
        new = list(range(10**6, 10**6 + 60))
        rs = [rec_of(i) for i in new]
        add(s, new, [r[0] for r in rs], [r[1] for r in rs], [r[2] for r in rs])
        model.update({i: (r[1], r[2]) for i, r in zip(new, rs)})
        s.flush()
    engramdb.verify(path)
    return path, model


@pytest.mark.parametrize("which", ["crashed", "compacted"])
def test_isolation_after_kill_and_compaction(request, which):
    path, model = request.getfixturevalue(which)

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(flt=st.one_of(st.none(), filters), scope=scopes, qv=st.lists(st.integers(-4, 4), min_size=DIM, max_size=DIM))
    def run(flt, scope, qv):
        check(s, model, flt, scope, np.array(qv, dtype=np.float32))

    with Store(path, read_only=True) as s:
        assert sorted(s.ids().tolist()) == sorted(model)
        run()
        # every scope combination, no filter: the partition is exact
        for scope in [(u, a, se) for u in USERS for a in AGENTS for se in SESSIONS]:
            check(s, model, None, scope, np.ones(DIM, dtype=np.float32))


def test_memory_search_stays_in_scope(tmp_path):
    """The Memory layer adds a keyword (BM25) path: hybrid, keyword and vector
    searches must all stay in their scope and filter."""
    words = ["apple", "pear", "plum", "fig", "kiwi", "lime"]

    def embed(texts):
        out = np.zeros((len(texts), 8), dtype=np.float32)
        for r, t in enumerate(texts):
            for w in t.split():
                out[r, hash(w) % 8] += 1.0
            out[r, 7] += 0.5
        return out

    rnd = random.Random(3)
    mem = engramdb.Memory(tmp_path / "m", embedder=embed)
    model = {}
    for _ in range(120):
        text = " ".join(rnd.choice(words) for _ in range(3))
        scope = (rnd.choice(USERS), rnd.choice(AGENTS), rnd.choice(SESSIONS))
        meta = {"k": rnd.randint(0, 3), "tag": rnd.choice(["x", "y"])}
        mid = mem.add(text, user_id=scope[0], agent_id=scope[1], session_id=scope[2], metadata=meta)
        mid = int(mid[0]) if isinstance(mid, (list, tuple, np.ndarray)) else int(mid)
        model[mid] = (scope, meta)
    ids = sorted(model)
    for _ in range(40):
        a, b = rnd.sample(ids, 2)
        mem.link(a, b, "rel", 0.9)
    flts = [None, {"k": {"gte": 2}}, {"or": [{"tag": "x"}, {"k": 0}]}, {"not": {"tag": "y"}}]
    for mode in ("hybrid", "keyword", "vector"):
        for _ in range(25):
            scope = (rnd.choice(USERS), rnd.choice(AGENTS), rnd.choice(SESSIONS))
            flt = rnd.choice(flts)
            q = " ".join(rnd.choice(words) for _ in range(2))
            hits = mem.search(q, k=200, filters=flt, user_id=scope[0], agent_id=scope[1], session_id=scope[2],
                              mode=mode, expand_links=1)
            want = {i for i, (sc, m) in model.items() if in_scope(sc, scope) and (flt is None or evaluate(flt, m))}
            got = {h.id for h in hits}
            assert got <= want, f"{mode} search left scope {scope} / filter {flt}: {got - want}"
            if mode == "vector":
                assert got == want
    mem.close()


def test_scope_json_round_trip_is_exact(tmp_path):
    """Scope values are compared exactly: no prefix, case or unicode folding."""
    names = ["ann", "Ann", "ann ", "an", "annn", "änn", "ann\u0000x", ""]
    with Store(tmp_path / "s", dim=2) as s:
        s.add(np.ones((len(names), 2), dtype=np.float32), user_id=names)
        for j, name in enumerate(names):
            ids, _ = s.search(np.ones(2, dtype=np.float32), k=len(names), user_id=name)
            assert [int(i) for i in ids if i != MISSING_ID] == [j], name

"""Concurrency: readers beside one writer, in threads and in processes.

Every scenario runs in a child process under ``RUST_BACKTRACE=1`` with a
time limit, so a deadlock fails the test (with every thread's Python stack,
from faulthandler) instead of hanging CI, and a Rust panic shows its
backtrace.

Consistency is checked exactly, not statistically. The writer logs every
operation it has completed; a reader notes the writer's completed-operation
count ``v0`` before a call and ``v1`` after it. Writes and reads are
serialised per handle, so the call saw the state after exactly ``j``
operations for some ``j`` in ``[v0, v1 + 1]`` (operation ``v1 + 1`` may have
been running). Afterwards the log is replayed and each observation must
equal what some such state gives: the exact top-k (ids in order, scores
recomputed from the vectors of that state), the exact filtered top-k, the
record of ``get`` (text, metadata and vector of one version, never a mix),
``len``. Vectors have small integer coordinates and the metric is squared
L2, so every score is an exact integer and ties break by id.
"""

from __future__ import annotations

import faulthandler
import functools
import gc
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import engramdb
from engramdb import MISSING_ID, Store

HERE = Path(__file__).resolve()
DIM = 8
K = 6


@functools.cache
def _vec(id_: int, ver: int) -> tuple:
    v = [((id_ * 7919 + ver * 104729 + c * 31337) * 2654435761 >> 7) % 9 - 4 for c in range(DIM)]
    v[id_ % DIM] += 5  # never the zero vector
    return tuple(float(x) for x in v)


def vec(id_: int, ver: int) -> np.ndarray:
    """The vector of version ``ver`` of ``id_``: small integers, never all zero."""
    return np.array(_vec(id_, ver), dtype=np.float32)


def meta(id_: int, ver: int) -> dict:
    return {"g": id_ % 3, "ver": ver}


def user(id_: int) -> str:
    return f"u{id_ % 2}"


def topk(state: dict[int, int], q: np.ndarray, k: int, keep=None) -> tuple[list[int], list[float]]:
    """Exact top-k of ``state`` (id -> version) by squared L2, ties by id."""
    ids = sorted(i for i in state if keep is None or keep(i, state[i]))
    if not ids:
        return [], []
    m = np.array([_vec(i, state[i]) for i in ids], dtype=np.float64)
    d = ((m - q) ** 2).sum(axis=1)
    order = np.lexsort((np.array(ids), d))[: min(k, len(state))]
    return [ids[j] for j in order], [float(d[j]) for j in order]


def replay(log: list[tuple], n: int):
    """States after 0, 1, ..., n operations of ``log`` (as id -> version dicts, yielded lazily)."""
    state: dict[int, int] = {}
    yield 0, state
    for j, op in enumerate(log[:n], start=1):
        kind = op[0]
        if kind in ("add", "upsert"):
            for i, ver in op[1]:
                state[i] = ver
        elif kind == "delete":
            for i in op[1]:
                del state[i]
        yield j, state


# -- the writer's workload --------------------------------------------------
class Writer:
    """Adds, upserts, deletes, links, flushes; logs each op once it returned."""

    def __init__(self, store: Store, seed: int, live: int = 240):
        self.s = store
        self.rnd = random.Random(seed)
        self.state: dict[int, int] = {}
        self.log: list[tuple] = []
        self.next_id = 0
        self.live = live

    def put(self, pairs, upsert):
        ids = [i for i, _ in pairs]
        vs = np.stack([vec(i, v) for i, v in pairs])
        kw = dict(
            ids=ids,
            texts=[f"{i}:{v}" for i, v in pairs],
            metadata=[meta(i, v) for i, v in pairs],
            user_id=[user(i) for i in ids],
        )
        (self.s.upsert if upsert else self.s.add)(vs, **kw)

    def step(self):
        r = self.rnd.random()
        live = sorted(self.state)
        if r < 0.02:
            self.s.flush()
            op = ("flush",)
        elif r < 0.06 and len(live) >= 2:
            a, b = self.rnd.sample(live, 2)
            self.s.link(a, b, "rel", 0.5)
            op = ("link", a, b)
        elif len(live) > self.live or (r < 0.35 and live):
            gone = self.rnd.sample(live, min(len(live), self.rnd.randint(1, 4)))
            assert self.s.delete(gone) == len(gone)
            op = ("delete", gone)
        elif r < 0.6 and live:
            pairs = [(i, self.state[i] + 1) for i in self.rnd.sample(live, min(len(live), self.rnd.randint(1, 4)))]
            self.put(pairs, True)
            op = ("upsert", pairs)
        else:
            n = self.rnd.randint(1, 8)
            pairs = [(self.next_id + j, 0) for j in range(n)]
            self.next_id += n
            self.put(pairs, False)
            op = ("add", pairs)
        if op[0] in ("add", "upsert"):
            for i, v in op[1]:
                self.state[i] = v
        elif op[0] == "delete":
            for i in op[1]:
                del self.state[i]
        self.log.append(op)  # completed: readers may now rely on it


# -- checking observations against the replayed log --------------------------
def check_observations(log: list[tuple], obs: list[tuple]) -> dict[str, int]:
    """Each observation ``(v0, v1, kind, args, result)`` must match a state
    ``j`` in ``[v0, v1 + 1]``. Returns counts per kind."""
    pending = sorted(range(len(obs)), key=lambda o: obs[o][0])
    pos = 0
    open_: list[int] = []
    counts: dict[str, int] = {}
    n = len(log)
    for j, state in replay(log, n):
        while pos < len(pending) and obs[pending[pos]][0] <= j:
            open_.append(pending[pos])
            pos += 1
        still = []
        for o in open_:
            v0, v1, kind, args, result = obs[o]
            if matches(state, kind, args, result):
                counts[kind] = counts.get(kind, 0) + 1
                continue
            if j >= min(v1 + 1, n):
                raise AssertionError(
                    f"{kind}{args!r} -> {result!r} matches no state in [{v0}, {v1 + 1}] (log has {n} ops)"
                )
            still.append(o)
        open_ = still
    assert not open_ and pos == len(pending)
    return counts


def matches(state: dict[int, int], kind: str, args, result) -> bool:
    if kind == "len":
        return result == len(state)
    if kind == "get":
        (i,) = args
        if result is None:
            return i not in state
        text, md, v = result
        return i in state and text == f"{i}:{state[i]}" and md == meta(i, state[i]) and v == vec(i, state[i]).tolist()
    q = np.asarray(args[0], dtype=np.float32)
    if kind == "search_ann":  # approximate: every hit real in this state, scored from its vector, in order
        got_ids, got_scores = result
        if len(got_ids) != min(K, len(state)) or len(set(got_ids)) != len(got_ids):
            return False
        if any(i not in state for i in got_ids):
            return False
        want = [float(((np.array(_vec(i, state[i])) - q) ** 2).sum()) for i in got_ids]
        return want == got_scores and want == sorted(want)
    keep = None
    if kind == "search_g1":
        keep = lambda i, ver: i % 3 == 1  # noqa: E731
    elif kind == "search_u0":
        keep = lambda i, ver: user(i) == "u0"  # noqa: E731
    elif kind == "search_u1_not_g0":
        keep = lambda i, ver: user(i) == "u1" and i % 3 != 0  # noqa: E731
    want_ids, want_scores = topk(state, q, K, keep)
    got_ids, got_scores = result
    kk = min(K, len(state)) if state else 1
    if len(got_ids) != kk:
        return False
    pad = kk - len(want_ids)
    return got_ids == want_ids + [int(MISSING_ID)] * pad and got_scores[: len(want_ids)] == want_scores


def reader_loop(s: Store, w: Writer, obs: list, stop: threading.Event, seed: int, ann: bool = False) -> None:
    rnd = random.Random(seed)
    plain = "search_ann" if ann else "search"
    qs = [vec(10**6 + seed * 1000 + t, 0) for t in range(64)]
    while not stop.is_set():
        v0 = len(w.log)
        r = rnd.random()
        q = rnd.choice(qs)
        if r < 0.3:
            ids, sc = s.search(q, k=K)
            obs.append((v0, len(w.log), plain, (q.tolist(),), (ids.tolist(), sc.tolist())))
        elif r < 0.45:
            ids, sc = s.search(q, k=K, filter={"g": 1})
            obs.append((v0, len(w.log), "search_g1", (q.tolist(),), (ids.tolist(), sc.tolist())))
        elif r < 0.55:
            ids, sc = s.search(q, k=K, user_id="u0")
            obs.append((v0, len(w.log), "search_u0", (q.tolist(),), (ids.tolist(), sc.tolist())))
        elif r < 0.65:
            ids, sc = s.search(q, k=K, user_id="u1", filter={"not": {"g": 0}})
            obs.append((v0, len(w.log), "search_u1_not_g0", (q.tolist(),), (ids.tolist(), sc.tolist())))
        elif r < 0.72:
            # a batch of queries is one consistent state too
            batch = np.stack([rnd.choice(qs) for _ in range(4)])
            ids, sc = s.search(batch, k=K)
            v1 = len(w.log)
            for qi in range(4):
                obs.append((v0, v1, plain, (batch[qi].tolist(),), (ids[qi].tolist(), sc[qi].tolist())))
        elif r < 0.95:
            i = rnd.randrange(max(1, w.next_id + 4))
            try:
                rec = s.get(i)
                res = (rec.text, rec.metadata, rec.vector.tolist())
            except engramdb.NotFoundError:
                res = None
            obs.append((v0, len(w.log), "get", (i,), res))
        else:
            n = len(s)
            obs.append((v0, len(w.log), "len", (), n))


def scenario_threads(path: str, seconds: float, readers: int, ann: bool = False) -> dict:
    """One writer thread and ``readers`` reader threads share one handle.
    With ``ann``, the store is past ``ann_threshold``: unfiltered searches go
    through the SPANN index, which every write updates."""
    engramdb.set_num_threads(4)  # several workers even on a 2-core runner
    s = Store(path, dim=DIM, metric="l2", sync=False, checkpoint_bytes=16 * 1024,
              ann_threshold=1000 if ann else None)
    w = Writer(s, seed=7, live=1400 if ann else 240)
    if ann:
        pairs = [(i, 0) for i in range(1300)]
        w.put(pairs, False)
        w.next_id = 1300
        w.state.update(pairs)
        w.log.append(("add", pairs))
    for _ in range(60):  # something to search from the start
        w.step()
    stop = threading.Event()
    obs_lists: list[list] = [[] for _ in range(readers)]
    errors: list[BaseException] = []

    def guard(fn, *a):
        try:
            fn(*a)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            stop.set()

    ts = [threading.Thread(target=guard, args=(reader_loop, s, w, obs_lists[t], stop, t, ann)) for t in range(readers)]
    for t in ts:
        t.start()
    t0 = time.monotonic()

    def write():
        while time.monotonic() - t0 < seconds and not stop.is_set():
            w.step()

    guard(write)
    stop.set()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    obs = [o for lst in obs_lists for o in lst]
    counts = check_observations(w.log, obs)
    info = s.info()
    s.close()
    # the store on disk is the writer's final state
    with Store(path, read_only=True) as r:
        assert sorted(r.ids().tolist()) == sorted(w.state)
        for i in random.Random(1).sample(sorted(w.state), min(20, len(w.state))):
            assert r.get(i).text == f"{i}:{w.state[i]}"
    flushes = sum(op[0] == "flush" for op in w.log)
    return {"ops": len(w.log), "observations": len(obs), "counts": counts, "flushes": flushes,
            "generation": info["generation"], "index": info["index"]}


def scenario_ann_first_search(path: str, reps: int) -> dict:
    """Regression: several threads making the first unfiltered search of a
    store past ``ann_threshold`` (which builds the SPANN index on the rayon
    pool) deadlocked when the others blocked on the index's lock inside the
    pool (about 1 run in 20 with 8 threads and 4 workers)."""
    engramdb.set_num_threads(4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 16)).astype(np.float32)
    with Store(path, dim=16, metric="ip") as s:
        s.add(x)
    searches = 0
    for _ in range(reps):
        s = Store(path, read_only=True, ann_threshold=1500)
        qs = rng.standard_normal((8, 16)).astype(np.float32)
        errs: list[BaseException] = []
        results: list[tuple] = []

        def go(i, s=s, qs=qs, errs=errs, results=results):
            try:
                ids, sc = s.search(qs[i], k=5)
                results.append((i, ids, sc))
                s.search(qs[i], k=5, filter={"x": 1})
            except BaseException as e:  # noqa: BLE001
                errs.append(e)

        ts = [threading.Thread(target=go, args=(i,)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errs, errs
        assert s.info()["index"] == "spann"
        for i, ids, sc in results:  # approximate, but every hit is real and scored right
            assert len(set(ids.tolist())) == 5 and (ids < len(x)).all()
            np.testing.assert_allclose(sc, x[ids.astype(np.int64)] @ qs[i], rtol=1e-4, atol=1e-4)
            searches += 1
        s.close()
    return {"reps": reps, "searches": searches}


def scenario_memory(path: str, seconds: float, readers: int) -> dict:
    """A Memory shared by a writer thread (add, update, delete, link) and
    reader threads (hybrid, keyword and vector searches, get). Texts name
    their id and version, so a hit whose text, vector and keyword entry came
    from different writes shows; afterwards the keyword index and the store
    hold the same ids and every memory is found by its own words."""
    words = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "yuzu"]

    def embed(texts):
        out = np.zeros((len(texts), 16), dtype=np.float32)
        for r, t in enumerate(texts):
            for w in t.split():
                out[r, sum(map(ord, w)) % 16] += 1.0
        return out

    engramdb.set_num_threads(4)
    mem = engramdb.Memory(path, embedder=embed, sync=False)
    rnd = random.Random(4)
    live: dict[int, int] = {}  # id -> version
    ever: set[int] = set()
    stop = threading.Event()
    errors: list[BaseException] = []
    counts = {"writes": 0, "searches": 0, "hits": 0}

    def text(i: int, ver: int) -> str:
        return f"id{i} v{ver} " + " ".join(words[(i * 7 + ver * 3 + j) % len(words)] for j in range(3))

    def write():
        n = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds and not stop.is_set():
            r = rnd.random()
            if r < 0.5 or len(live) < 20:
                ever.add(n)  # ids are assigned in order: this add gets id n
                i = int(mem.add(text(n, 0), user_id=f"u{n % 3}"))
                assert i == n
                live[i] = 0
                n += 1
            elif r < 0.75:
                i = rnd.choice(sorted(live))
                live[i] += 1
                mem.update(i, text(i, live[i]))
            elif r < 0.9:
                i = rnd.choice(sorted(live))
                del live[i]
                mem.delete(i)
            else:
                a, b = rnd.sample(sorted(live), 2)
                mem.link(a, b, "rel", 0.5)
            counts["writes"] += 1

    def read(seed):
        rr = random.Random(seed)
        while not stop.is_set():
            q = " ".join(rr.choice(words) for _ in range(2))
            mode = rr.choice(["hybrid", "keyword", "vector"])
            user = rr.choice([None, "u0", "u1", "u2"])
            hits = mem.search(q, k=8, mode=mode, user_id=user, expand_links=1, decay=False)
            counts["searches"] += 1
            for h in hits:
                counts["hits"] += 1
                assert h.id in ever, f"{mode} search returned an id never written: {h.id}"
                assert h.text.startswith(f"id{h.id} v"), f"hit {h.id} carries another memory's text: {h.text!r}"
                assert user is None or h.user_id == user
            if hits and rr.random() < 0.3:
                try:
                    it = mem.get(hits[0].id)
                    assert it.text.startswith(f"id{it.id} v")
                except engramdb.NotFoundError:
                    pass  # deleted since

    def guard(fn, *a):
        try:
            fn(*a)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            stop.set()

    ts = [threading.Thread(target=guard, args=(read, t)) for t in range(readers)]
    for t in ts:
        t.start()
    guard(write)
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    assert set(mem.keyword_index.ids()) == set(int(i) for i in mem.store.ids()) == set(live)
    for i, ver in live.items():
        got = mem.search(f"id{i}", k=1, mode="keyword")
        assert got and got[0].id == i and got[0].text == text(i, ver)
    mem.close()
    return {**counts, "live": len(live)}


# -- processes ------------------------------------------------------------------
def proc_writer(path: str, ops: int, log_path: str) -> None:
    s = Store(path, dim=DIM, metric="l2", sync=False, checkpoint_bytes=8 * 1024)
    w = Writer(s, seed=11, live=150)
    for _ in range(ops):
        w.step()
    s.close()
    Path(log_path).write_text(json.dumps(w.log))


def proc_reader(path: str, seconds: float, out_path: str, seed: int) -> None:
    """Open read-only again and again while the writer runs (until its log
    appears, ``seconds`` pass or 4,000 opens); note what each snapshot holds."""
    rnd = random.Random(seed)
    snaps = []
    t0 = time.monotonic()
    done = Path(path).parent / "log.json"
    while time.monotonic() - t0 < seconds and not done.exists() and len(snaps) < 4000:
        with Store(path, read_only=True) as r:
            ids = sorted(r.ids().tolist())
            assert len(r) == len(ids)
            recs = {}
            for i in rnd.sample(ids, min(8, len(ids))):
                rec = r.get(i)
                recs[i] = (rec.text, rec.metadata, rec.vector.tolist())
            q = vec(2 * 10**6 + len(snaps), 0)
            got = r.search(q, k=K) if ids else (np.array([]), np.array([]))
            snaps.append({"ids": ids, "recs": recs, "q": q.tolist(),
                          "hits": [got[0].tolist(), got[1].tolist()]})
    Path(out_path).write_text(json.dumps(snaps))


def scenario_processes(path: str, readers: int, ops: int, seconds: float) -> dict:
    d = Path(path).parent
    Store(path, dim=DIM, metric="l2").close()
    env = dict(os.environ, RUST_BACKTRACE="1")
    me = [sys.executable, str(HERE)]
    wp = subprocess.Popen(me + ["proc_writer", path, str(ops), str(d / "log.json")], env=env)
    rps = [
        subprocess.Popen(me + ["proc_reader", path, str(seconds), str(d / f"r{i}.json"), str(i)], env=env)
        for i in range(readers)
    ]
    assert wp.wait(timeout=120) == 0, "writer failed"
    for p in rps:
        assert p.wait(timeout=120) == 0
    log = [tuple(op) for op in json.loads((d / "log.json").read_text())]
    at = [dict(st) for _, st in replay(log, len(log))]  # state after j ops
    states: dict[tuple, list[int]] = {}
    for j, st in enumerate(at):
        states.setdefault(tuple(sorted(st)), []).append(j)
    opens = 0
    for i in range(readers):
        last = 0
        for snap in json.loads((d / f"r{i}.json").read_text()):
            key = tuple(snap["ids"])
            assert key in states, "a reader saw a set of ids that no prefix of the log has"
            # the earliest prefix with this id set at or after the previous snapshot's
            cands = [j for j in states[key] if j >= last]
            assert cands, "a reader went back in time"
            ok = None
            q = np.array(snap["q"], np.float32)
            for j in cands:
                st = at[j]
                recs_ok = all(
                    text == f"{k}:{st[int(k)]}" and md == meta(int(k), st[int(k)]) and v == vec(int(k), st[int(k)]).tolist()
                    for k, (text, md, v) in snap["recs"].items()
                )
                if recs_ok and snap["hits"] == list(topk(st, q, K)):
                    ok = j
                    break
            assert ok is not None, "a reader's snapshot (records, search) matches no prefix of the log"
            last = ok
            opens += 1
    return {"ops": len(log), "reader_opens": opens, "readers": readers}


# -- running a scenario in a child, with a time limit ----------------------------
def run_child(tmp_path: Path, *args: str, timeout: float = 90) -> dict:
    env = dict(os.environ, RUST_BACKTRACE="1", PYTHONFAULTHANDLER="1")
    out = tmp_path / "result.json"
    try:
        p = subprocess.run(
            [sys.executable, str(HERE), *args, "--out", str(out)],
            env=env, capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"deadlock? {args[0]} ran past {timeout} s\n{(e.stderr or b'')!s:.8000}")
    assert p.returncode == 0, f"{args[0]} failed (rc {p.returncode})\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}"
    assert "panicked" not in p.stderr, p.stderr[-8000:]
    return json.loads(out.read_text())


def test_reader_threads_see_only_committed_states(tmp_path):
    r = run_child(tmp_path, "threads", str(tmp_path / "s"), "4", "3")
    assert r["ops"] > 300 and r["flushes"] > 3 and r["generation"] > 5
    c = r["counts"]
    assert r["observations"] > 1000 and all(c.get(k, 0) > 20 for k in ("search", "search_g1", "get", "len")), r


def test_reader_threads_beside_a_writer_past_the_ann_threshold(tmp_path):
    r = run_child(tmp_path, "threads_ann", str(tmp_path / "s"), "3", "3")
    assert r["index"] == "spann" and r["ops"] > 200
    assert r["counts"].get("search_ann", 0) > 100 and r["counts"].get("search_g1", 0) > 20, r


def test_memory_shared_between_threads(tmp_path):
    r = run_child(tmp_path, "memory", str(tmp_path / "m"), "3", "3")
    assert r["writes"] > 50 and r["searches"] > 50, r


def test_concurrent_first_ann_searches_do_not_deadlock(tmp_path):
    r = run_child(tmp_path, "ann", str(tmp_path / "s"), "30")
    assert r["searches"] == 30 * 8


def test_reader_processes_beside_a_writer_process(tmp_path):
    (tmp_path / "w").mkdir()
    r = run_child(tmp_path, "processes", str(tmp_path / "w" / "s"), "3", "2500", "30")
    assert r["ops"] == 2500 and r["reader_opens"] >= 30, r


def test_second_writer_is_refused_until_the_first_closes(tmp_path):
    path = tmp_path / "s"
    w = Store(path, dim=4)
    w.add(np.eye(4, dtype=np.float32))
    with pytest.raises(engramdb.StoreLockedError):
        Store(path)
    # another process is refused too, while readers are welcome
    code = (
        "import sys, engramdb\n"
        "try:\n    engramdb.Store(sys.argv[1])\nexcept engramdb.StoreLockedError:\n    sys.exit(7)\n"
    )
    assert subprocess.run([sys.executable, "-c", code, str(path)], timeout=60).returncode == 7
    with Store(path, read_only=True) as r:
        assert len(r) == 4
        with pytest.raises(engramdb.ReadOnlyError):
            r.add(np.ones(4, dtype=np.float32))
    w.close()
    with Store(path) as w2:  # the lock went with the first writer
        assert len(w2) == 4


def _fds() -> set:
    """The open file descriptors as (number, what it points at): a descriptor that an earlier test left to the
    garbage collector (an event loop's epoll and socket pair, say) may close while this test runs, so a leak
    is a descriptor that is open after and was not before, not a change in the count."""
    gc.collect()
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:  # the descriptor listdir itself held, closed by now
            pass
    return out


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_no_file_handles_leak(tmp_path):
    path = tmp_path / "s"
    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    with Store(path, dim=8, checkpoint_bytes=4096) as s:
        s.add(x)
    before = _fds()
    for i in range(150):
        with Store(path, checkpoint_bytes=4096) as s:
            s.add(x[i % 50], ids=[1000 + i])
            s.search(x[0], k=3)
            if i % 10 == 0:
                s.flush()
            with pytest.raises(engramdb.StoreLockedError):
                Store(path)
        r = Store(path, read_only=True)
        r.search(x[:4], k=3, filter={"a": 1})
        r.close()
        r.close()  # idempotent
        with pytest.raises(engramdb.StoreClosedError):
            r.search(x[0], k=1)
        with pytest.raises(engramdb.InvalidArgumentError):
            Store(tmp_path / "nothing", read_only=True)
    assert not _fds() - before, "file descriptors leaked"
    engramdb.verify(path)
    assert not _fds() - before


def test_close_while_searching_is_clean(tmp_path):
    """Closing a handle other threads are searching: they finish or get
    StoreClosedError, nothing crashes."""
    x = np.random.default_rng(1).standard_normal((3000, 32)).astype(np.float32)
    with Store(tmp_path / "s", dim=32) as s:
        s.add(x)
    for _ in range(5):
        s = Store(tmp_path / "s", read_only=True)
        outcomes: list[str] = []

        def go(s=s, outcomes=outcomes):
            for _ in range(200):
                try:
                    s.search(x[:8], k=5)
                    outcomes.append("ok")
                except engramdb.StoreClosedError:
                    outcomes.append("closed")
                    return

        ts = [threading.Thread(target=go) for _ in range(4)]
        for t in ts:
            t.start()
        time.sleep(0.02)
        s.close()
        for t in ts:
            t.join(timeout=60)
            assert not t.is_alive()
        assert outcomes.count("closed") == 4


if __name__ == "__main__":
    # child entry point: python test_concurrency.py SCENARIO ARGS... [--out FILE]
    faulthandler.dump_traceback_later(80, exit=True)  # stacks of every thread if stuck
    argv = sys.argv[1:]
    out = None
    if "--out" in argv:
        out = argv[argv.index("--out") + 1]
        argv = argv[: argv.index("--out")]
    name, *rest = argv
    if name == "threads":
        res = scenario_threads(rest[0], float(rest[1]), int(rest[2]))
    elif name == "threads_ann":
        res = scenario_threads(rest[0], float(rest[1]), int(rest[2]), ann=True)
    elif name == "memory":
        res = scenario_memory(rest[0], float(rest[1]), int(rest[2]))
    elif name == "ann":
        res = scenario_ann_first_search(rest[0], int(rest[1]))
    elif name == "processes":
        res = scenario_processes(rest[0], int(rest[1]), int(rest[2]), float(rest[3]))
    elif name == "proc_writer":
        proc_writer(rest[0], int(rest[1]), rest[2])
        res = {}
    elif name == "proc_reader":
        proc_reader(rest[0], float(rest[1]), rest[2], int(rest[3]))
        res = {}
    else:
        raise SystemExit(f"unknown scenario {name}")
    if out:
        Path(out).write_text(json.dumps(res))
        print(json.dumps(res))

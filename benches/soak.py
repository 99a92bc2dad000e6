"""Soak: a long scripted mixed workload checked against a pure-Python model.

The store holds a constant live set (``--live`` records) while records churn
through it: each round adds a batch, upserts some, deletes back down to the
live size, links and unlinks pairs, searches a batch of queries (plain,
filtered and scoped), reads records, and every so often forgets by age
(``forget(action="archive")`` in one scope, ``forget(action="delete")``
everywhere, on a simulated clock), flushes, or closes and reopens the store.
A pure-Python/numpy model tracks every record (vector, text, metadata, scope,
archived flag, links) and the script checks, as it goes:

- search: every query of a sampled sub-batch against the model's exact top-k
  (same number of hits, every hit visible in its scope and filter, each
  returned score equal to the score recomputed from the model's vector, the
  scores equal to the exact top-k's scores; tolerance 1e-4); for the other
  queries, that every hit is a live, visible record;
- records: text, metadata, scope, archived flag and the exact vector of
  sampled ids; sampled deleted ids are gone;
- links: the links of sampled records equal the model's;
- forget: the ids a forget reports equal the model's;
- counts: ``len(store)`` after every round; the full id set after every reopen.

Disk bytes (sum of the store folder's files) and the process RSS are sampled
throughout; both must stay bounded while the live set is constant: the
maximum over the last quarter of the run may exceed the maximum over the
second quarter by at most 25% (plus 16 MiB of RSS slack). The script writes
``soak.json`` (figures and samples) and ``soak.png`` (the plot).

How operations are counted: one per record added, upserted or deleted (also
the ones a forget deletes or archives), one per query searched (a batch of
64 queries is 64), one per record read with ``get`` or ``links``, one per
link or unlink, and one per ``forget``, ``flush`` and reopen call. ``len``
and the checks' own model work are not counted.

    python benches/soak.py                     # 1,000,000 ops, figures in benches/
    python benches/soak.py --ops 20000 --live 2000 --out /tmp/soak   # quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

import engramdb
from engramdb import MISSING_ID, Store

DAY = 86_400.0
STEP = 60.0  # simulated seconds per round
USERS = 6
TAGS = ("x", "y", "z")


class Model:
    """The expected contents of the store."""

    def __init__(self, dim: int, cap: int):
        self.dim = dim
        self.vec = np.zeros((cap, dim), dtype=np.float32)
        self.alive = np.zeros(cap, dtype=bool)
        self.archived = np.zeros(cap, dtype=bool)
        self.kval = np.zeros(cap, dtype=np.int64)
        self.tag = np.zeros(cap, dtype=np.int64)
        self.user = np.zeros(cap, dtype=np.int64)
        self.born = np.zeros(cap, dtype=np.float64)
        self.slot_id = np.zeros(cap, dtype=np.uint64)
        self.slot: dict[int, int] = {}
        self.free = list(range(cap - 1, -1, -1))
        self.text: dict[int, str] = {}
        self.links: dict[int, dict[int, tuple[str, float]]] = {}

    def __len__(self) -> int:
        return len(self.slot)

    def put(self, i: int, v: np.ndarray, text: str, k: int, tag: int, user: int, now: float) -> None:
        s = self.slot.get(i)
        if s is None:
            s = self.free.pop()
            self.slot[i] = s
            self.alive[s] = True
            self.archived[s] = False
            self.born[s] = now
            self.slot_id[s] = i
            self.links[i] = {}
        self.vec[s] = v
        self.kval[s], self.tag[s], self.user[s] = k, tag, user
        self.text[i] = text

    def delete(self, i: int) -> None:
        s = self.slot.pop(i)
        self.alive[s] = False
        self.free.append(s)
        del self.text[i]
        for t in self.links.pop(i):
            self.links[t].pop(i, None)

    def mask(self, flt: Optional[dict], user: Optional[int]) -> np.ndarray:
        m = self.alive & ~self.archived
        if user is not None:
            m &= self.user == user
        if flt is not None:
            m &= eval_filter(flt, self)
        return m

    def meta(self, i: int) -> dict[str, Any]:
        s = self.slot[i]
        return {"k": int(self.kval[s]), "tag": TAGS[int(self.tag[s])]}


def eval_filter(flt: dict, m: Model) -> np.ndarray:
    """The few filter shapes the soak uses, evaluated over the model's arrays."""
    if "or" in flt:
        out = np.zeros_like(m.alive)
        for f in flt["or"]:
            out |= eval_filter(f, m)
        return out
    ((field, cond),) = flt.items()
    col = m.kval if field == "k" else m.tag
    if not isinstance(cond, dict):
        return col == (TAGS.index(cond) if field == "tag" else cond)
    ((op, val),) = cond.items()
    return {"lt": col < val, "gte": col >= val}[op]


class Soak:
    def __init__(self, path: Path, dim: int, live: int, seed: int, sync: bool, checkpoint_bytes: int):
        self.path, self.dim, self.live = path, dim, live
        self.rnd = random.Random(seed)
        self.rng = np.random.default_rng(seed)
        self.batch = max(8, min(64, live // 32))
        self.model = Model(dim, live + 4 * self.batch + 16)
        self.opts = dict(sync=sync, checkpoint_bytes=checkpoint_bytes, ann_threshold=None)
        self.store = Store(path, dim=dim, metric="ip", **self.opts)
        self.next_id = 0
        self.clock = 1_700_000_000.0
        self.ops = 0
        self.counts: dict[str, int] = {}
        self.checked = {"search_exact": 0, "search_hits": 0, "records": 0, "links": 0, "deleted_absent": 0}
        self.reopens = 0

    def count(self, kind: str, n: int = 1) -> None:
        self.ops += n
        self.counts[kind] = self.counts.get(kind, 0) + n

    # -- writes ------------------------------------------------------------
    def add(self, n: int) -> None:
        ids = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        self._put(ids, upsert=False)
        self.count("add", n)

    def _put(self, ids: list[int], upsert: bool) -> None:
        v = self.rng.standard_normal((len(ids), self.dim)).astype(np.float32)
        ks = [self.rnd.randrange(10) for _ in ids]
        tags = [self.rnd.randrange(len(TAGS)) for _ in ids]
        users = [self.rnd.randrange(USERS) for _ in ids]
        texts = [f"m{i}-{self.rnd.randrange(1000)}" for i in ids]
        fn = self.store.upsert if upsert else self.store.add
        got = fn(v, ids=ids, texts=texts, metadata=[{"k": k, "tag": TAGS[t]} for k, t in zip(ks, tags)],
                 user_id=[f"u{u}" for u in users], now=self.clock)
        assert got.tolist() == ids
        for j, i in enumerate(ids):
            self.model.put(i, v[j], texts[j], ks[j], tags[j], users[j], self.clock)

    def upsert(self, n: int) -> None:
        ids = self.rnd.sample(sorted(self.model.slot), min(n, len(self.model)))
        if ids:
            self._put(ids, upsert=True)
            self.count("upsert", len(ids))

    def delete_down(self) -> None:
        extra = len(self.model) - self.live
        if extra <= 0:
            return
        ids = self.rnd.sample(list(self.model.slot), extra)
        assert self.store.delete(ids) == len(ids)
        for i in ids:
            self.model.delete(i)
        self.count("delete", len(ids))
        self.gone = ids

    def link_some(self, n: int) -> None:
        live = list(self.model.slot)
        for _ in range(n):
            a, b = self.rnd.sample(live, 2)
            la, lb = self.model.links[a], self.model.links[b]
            if b not in la and (len(la) >= 15 or len(lb) >= 15):
                continue  # stay under the degree cap (16): no evictions to model
            kind, w = self.rnd.choice((("rel", 0.5), ("similar", 0.75), ("next", 1.0)))
            self.store.link(a, b, kind, w)
            la[b], lb[a] = (kind, w), (kind, w)
            self.count("link")
        # unlink one existing link now and then
        a = self.rnd.choice(live)
        if self.model.links[a]:
            b = self.rnd.choice(sorted(self.model.links[a]))
            assert self.store.unlink(a, b) is True
            del self.model.links[a][b], self.model.links[b][a]
            self.count("unlink")

    def forget(self, action: str, age_days: float, user: Optional[int]) -> None:
        # ages are whole rounds: put the threshold half a round off any age
        age = (round(age_days * DAY / STEP) + 0.5) * STEP
        thr = math.exp(-age / DAY)
        scope = {} if user is None else {"user_id": f"u{user}"}
        rep = self.store.forget(threshold=thr, now=self.clock, action=action, **scope)
        m = self.model
        sel = m.alive & (self.clock - m.born > age)
        if user is not None:
            sel &= m.user == user
        if action == "archive":
            sel &= ~m.archived
        want = sorted(int(i) for i in m.slot_id[sel])
        assert sorted(rep["ids"]) == want, f"forget({action}) reported {len(rep['ids'])} ids, model {len(want)}"
        for i in want:
            if action == "delete":
                m.delete(i)
            else:
                m.archived[m.slot[i]] = True
        self.count("forget")
        self.count(f"forget_{action}d", len(want))

    def flush(self) -> None:
        self.store.flush()
        self.count("flush")

    def reopen(self) -> None:
        self.store.close()
        self.store = Store(self.path, **self.opts)
        self.reopens += 1
        self.count("reopen")
        assert len(self.store) == len(self.model)
        assert sorted(self.store.ids().tolist()) == sorted(self.model.slot)

    # -- reads and checks -----------------------------------------------------
    def search(self, nq: int, check: int) -> None:
        m = self.model
        q = self.rng.standard_normal((nq, self.dim)).astype(np.float32)
        shape = self.rnd.randrange(5)
        flt: Optional[dict] = None
        user: Optional[int] = None
        if shape == 1:
            flt = {"k": {"lt": self.rnd.randrange(1, 10)}}
        elif shape == 2:
            user = self.rnd.randrange(USERS)
        elif shape == 3:
            flt = {"or": [{"tag": self.rnd.choice(TAGS)}, {"k": {"gte": 8}}]}
            user = self.rnd.randrange(USERS)
        k = 10
        ids, scores = self.store.search(q, k=k, filter=flt, user_id=None if user is None else f"u{user}")
        self.count("search", nq)
        vis = m.mask(flt, user)
        n_vis = int(vis.sum())
        kk = min(k, len(m))
        assert ids.shape == (nq, kk)
        want_n = min(kk, n_vis)
        real = ids != MISSING_ID
        assert (real.sum(axis=1) == want_n).all(), "wrong number of hits"
        slots = np.array([m.slot.get(int(i), -1) for i in ids[real]])
        assert (slots >= 0).all(), "a search returned a deleted id"
        assert vis[slots].all(), "a search returned a record outside its scope, filter or archive state"
        self.checked["search_hits"] += int(real.sum())
        if not want_n:
            return
        vs = np.flatnonzero(vis)
        for r in self.rnd.sample(range(nq), min(check, nq)):
            exact = m.vec[vs] @ q[r]
            top = np.sort(exact)[::-1][:want_n]
            got_ids = ids[r, :want_n]
            got = scores[r, :want_n]
            recomputed = np.array([m.vec[m.slot[int(i)]] @ q[r] for i in got_ids])
            np.testing.assert_allclose(got, recomputed, atol=1e-4, err_msg="score differs from its vector's")
            np.testing.assert_allclose(got, top, atol=1e-4, err_msg="not the exact top-k")
            assert len(set(got_ids.tolist())) == want_n
            self.checked["search_exact"] += 1

    def check_records(self, n: int) -> None:
        m = self.model
        for i in self.rnd.sample(list(m.slot), min(n, len(m))):
            r = self.store.get(i)
            s = m.slot[i]
            assert r.text == m.text[i] and r.metadata == m.meta(i)
            assert r.user_id == f"u{int(m.user[s])}" and r.archived == bool(m.archived[s])
            assert np.array_equal(r.vector, m.vec[s]), f"vector of {i} differs"
            got_links = {t: (kind, w) for t, kind, w in self.store.links(i)}
            assert got_links == m.links[i], f"links of {i} differ"
            self.checked["records"] += 1
            self.checked["links"] += len(got_links)
        self.count("get", n)
        self.count("links_read", n)
        for i in getattr(self, "gone", [])[:4]:
            assert i not in self.store, f"deleted id {i} came back"
            self.checked["deleted_absent"] += 1

    def round(self, r: int) -> None:
        self.clock += STEP
        b = self.batch
        self.add(b)
        if r % 3 == 0:
            self.upsert(b // 4)
        self.delete_down()
        self.link_some(4)
        self.search(64, 16)
        self.check_records(16)
        assert len(self.store) == len(self.model)
        # ages in units of a record's mean life under the random deletes
        life_days = self.live / self.batch * STEP / DAY
        if r % 40 == 20:
            self.forget("archive", 1.0 * life_days, self.rnd.randrange(USERS))
        if r % 40 == 0 and r:
            self.forget("delete", 2.0 * life_days, None)
        if r % 150 == 75:
            self.flush()
        if r % 400 == 399:
            self.reopen()


def dir_bytes(p: Path) -> int:
    return sum(e.stat().st_size for e in os.scandir(p) if e.is_file())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bounded(xs: list[float], slack: float) -> tuple[bool, float, float]:
    """Whether the max over the last quarter stays within 25% (+ slack) of the
    max over the second quarter."""
    n = len(xs)
    q2 = max(xs[n // 4 : n // 2] or xs)
    q4 = max(xs[3 * n // 4 :] or xs)
    return q4 <= 1.25 * q2 + slack, q2, q4


def run(ops: int, live: int, dim: int = 32, seed: int = 0, out: Optional[Path] = None, plot: bool = True,
        sync: bool = False, checkpoint_bytes: int = 4 << 20, workdir: Optional[Path] = None,
        progress: bool = True) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="soak-", dir=workdir))
    path = tmp / "store"
    t0 = time.perf_counter()
    try:
        s = Soak(path, dim, live, seed, sync, checkpoint_bytes)
        # fill to the live size (counted: these are adds too)
        while len(s.model) < live:
            s.add(min(1024, live - len(s.model)))
        s.flush()
        samples: list[dict[str, float]] = []
        r = 0
        every = max(1, (ops // (s.batch * 4)) // 400)  # ~400 samples
        last_print = t0
        while s.ops < ops:
            s.round(r)
            if r % every == 0:
                samples.append({"ops": s.ops, "t": time.perf_counter() - t0, "disk": dir_bytes(path),
                                "rss": rss_bytes(), "live": len(s.model)})
            r += 1
            if progress and time.perf_counter() - last_print > 10:
                last_print = time.perf_counter()
                print(f"  {s.ops:>9,} ops  {samples[-1]['t']:6.0f} s  disk {samples[-1]['disk'] / 2**20:6.1f} MiB"
                      f"  rss {samples[-1]['rss'] / 2**20:6.1f} MiB  live {len(s.model)}", flush=True)
        s.reopen()  # nothing lost at the end either
        s.check_records(64)
        s.store.close()
        info = engramdb.verify(path)
        assert info["count"] == len(s.model)
        samples.append({"ops": s.ops, "t": time.perf_counter() - t0, "disk": dir_bytes(path), "rss": rss_bytes(),
                        "live": len(s.model)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - t0
    disk_ok, disk_q2, disk_q4 = bounded([x["disk"] for x in samples], 0)
    rss_ok, rss_q2, rss_q4 = bounded([x["rss"] for x in samples], 16 << 20)
    res = {
        "ops": s.ops,
        "rounds": r,
        "wall_s": round(wall, 1),
        "ops_per_s": round(s.ops / wall),
        "live": live,
        "dim": dim,
        "batch": s.batch,
        "sync": sync,
        "checkpoint_bytes": checkpoint_bytes,
        "counts": s.counts,
        "checked": s.checked,
        "reopens": s.reopens,
        "ids_assigned": s.next_id,
        "disk_bytes": {"max": max(x["disk"] for x in samples), "q2_max": disk_q2, "q4_max": disk_q4,
                       "final": samples[-1]["disk"], "bounded": disk_ok},
        "rss_bytes": {"max": max(x["rss"] for x in samples), "q2_max": rss_q2, "q4_max": rss_q4,
                      "bounded": rss_ok},
        "engramdb": engramdb.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "samples": samples,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps(res, indent=1))
        if plot:
            draw(res, out / "soak.png")
    return res


def draw(res: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["samples"]
    x = [p["ops"] / 1e6 for p in s]
    fig, ax = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    ax[0].plot(x, [p["disk"] / 2**20 for p in s], color="tab:blue")
    ax[0].set_ylabel("store on disk (MiB)")
    ax[1].plot(x, [p["rss"] / 2**20 for p in s], color="tab:red")
    ax[1].set_ylabel("process RSS (MiB)")
    ax[2].plot(x, [p["live"] for p in s], color="tab:green")
    ax[2].set_ylabel("live records")
    ax[2].set_xlabel("operations (millions)")
    for a in ax:
        a.set_ylim(bottom=0)
        a.grid(alpha=0.3)
    fig.suptitle(f"engramdb soak: {res['ops']:,} ops in {res['wall_s']:.0f} s, live set {res['live']:,} x {res['dim']}d, "
                 f"{res['ids_assigned']:,} ids churned", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=1_000_000)
    ap.add_argument("--live", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sync", action="store_true", help="fsync every write (default off: this tests bounds, not power loss)")
    ap.add_argument("--checkpoint-bytes", type=int, default=4 << 20)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--workdir", type=Path, default=None, help="where the temporary store goes")
    a = ap.parse_args()
    res = run(a.ops, a.live, a.dim, a.seed, a.out, True, a.sync, a.checkpoint_bytes, a.workdir)
    short = {k: v for k, v in res.items() if k != "samples"}
    print(json.dumps(short, indent=1))
    if not (res["disk_bytes"]["bounded"] and res["rss_bytes"]["bounded"]):
        raise SystemExit("disk or RSS kept growing with a constant live set")


if __name__ == "__main__":
    main()

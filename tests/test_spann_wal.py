"""SpannIndex updates are durable when they return: kill -9 a writer in the
middle of adds, deletes, flushes and compactions, and every acknowledged
update is there on reopen; one writer per directory."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import engramdb.errors as errors
from engramdb.spann import SpannIndex

DIM = 16
TABLE = 200_000  # the vector of id i is table()[i]


def table() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((TABLE, DIM)).astype(np.float32)


CHILD = r"""
import sys, numpy as np
from engramdb.spann import SpannIndex
path, start, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
table = np.random.default_rng(0).standard_normal((200_000, 16)).astype(np.float32)
rng = np.random.default_rng(seed)
idx = SpannIndex.open(path, mode="disk" if seed % 2 else "memory")
print("open", flush=True)
i, mine = start, []
while True:
    r = rng.random()
    if r < 0.12 and mine:
        d = rng.choice(mine, size=min(len(mine), int(rng.integers(1, 6))), replace=False)
        print("D " + " ".join(str(int(x)) for x in d), flush=True)   # about to delete
        idx.delete(d.astype(np.uint64))
        print("d", flush=True)                                       # acknowledged
        gone = set(d.tolist())
        mine = [m for m in mine if m not in gone]
    elif r < 0.15:
        idx.flush()
    elif r < 0.155:
        idx.compact()
    else:
        n = int(rng.integers(1, 30))
        idx.add(table[i:i + n], np.arange(i, i + n, dtype=np.uint64))
        print(f"a {i} {i + n}", flush=True)                          # acknowledged: [i, i + n)
        mine.extend(range(i, i + n))
        i += n
"""


def _brute(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    d = ((q[:, None, :] - x[None]) ** 2).sum(-1)
    return ids[np.argsort(d, axis=1, kind="stable")[:, :k]]


def test_sigkill_mid_updates_loses_no_acknowledged_update(tmp_path):
    t = table()
    path = tmp_path / "idx"
    SpannIndex.build(t[:3000], path, metric="l2", progress=False, posting_cap=64).close()
    present: set[int] = set(range(3000))  # acknowledged and not deleted
    deleted: set[int] = set()  # acknowledged deletes
    unsure: set[int] = set()  # a delete or an add cut short by the kill
    next_id = 3000
    rnd = random.Random(20261126)
    opened = waited = 0
    for round_ in range(24):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(next_id), str(round_)],
            stdout=subprocess.PIPE,
            text=True,
        )
        first = ""
        if round_ % 4 != 3:
            # kill mid-updates: wait until the child has opened (and replayed)
            # the index, however slow the machine is, then a random moment
            waited += 1
            assert proc.stdout is not None
            first = proc.stdout.readline()
            time.sleep(rnd.uniform(0.05, 0.8))
        else:
            # any moment, possibly during the open and its replay
            time.sleep(rnd.uniform(0.2, 1.0))
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out = first + out
        pending: list[int] = []
        hi_seen = next_id
        for line in out.splitlines():
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "open":
                opened += 1
            elif parts[0] == "a" and len(parts) == 3:
                lo, hi = int(parts[1]), int(parts[2])
                present.update(range(lo, hi))
                hi_seen = max(hi_seen, hi)
            elif parts[0] == "D":
                pending = [int(p) for p in parts[1:]]
            elif parts[0] == "d":
                present.difference_update(pending)
                deleted.update(pending)
                pending = []
        # a delete in flight may or may not have happened
        present.difference_update(pending)
        unsure.update(pending)
        # an add in flight may or may not have happened: its ids are never reused
        unsure.update(range(hi_seen, hi_seen + 30))
        next_id = hi_seen + 1000

        for mode in ("disk", "memory"):
            with SpannIndex.open(path, mode=mode, read_only=True) as idx:
                have = set(idx.ids().tolist())
                missing = present - have
                assert not missing, f"round {round_} {mode}: lost {len(missing)} acknowledged ids"
                back = deleted & have
                assert not back, f"round {round_} {mode}: deleted ids {sorted(back)[:5]} are back"
                assert have <= present | unsure, f"round {round_}: ids from nowhere"
        # the vectors are the right ones: answers match a brute-force scan
        live = np.array(sorted(have), dtype=np.int64)
        q = t[rnd.sample(sorted(present), 20)] + 0.01
        with SpannIndex.open(path, mode="disk", read_only=True) as idx:
            idx.verify()
            got = idx.search(q, k=10, nprobe=256, coarse_probe=256, rerank=200)[0]
            probe = np.array(rnd.sample(sorted(have), 50), dtype=np.int64)
            # every stored vector finds itself with a search wide enough to be
            # exact (the default search is approximate: its self-hit rate is
            # the ignored Rust test `stored_vectors_find_themselves`)
            self_hit = idx.search(t[probe], k=1, nprobe=256, coarse_probe=256, rerank=200)[0][:, 0]
        want = _brute(t[live], live, q, 10)
        recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(got, want)])
        assert recall >= 0.95, f"round {round_}: recall {recall}"
        np.testing.assert_array_equal(self_hit.astype(np.int64), probe)
    assert opened >= waited, "a child died before it opened the index"
    assert len(present) > 3000 + 500 and deleted
    with SpannIndex.open(path) as idx:  # a writer takes over after all of that
        assert present <= set(idx.ids().tolist())
        idx.flush()
        assert idx.stats()["log_bytes"] == 32


def test_updates_without_flush_survive_close_and_reopen(tmp_path):
    t = table()
    idx = SpannIndex.build(t[:1000], tmp_path / "i", metric="l2", progress=False)
    idx.add(t[1000:1100], np.arange(1000, 1100))
    assert idx.delete(np.arange(0, 50)) == 50
    q = t[:30] + 0.01
    want = idx.search(q, k=10)
    assert idx.stats()["log_bytes"] > 32
    idx.close()  # no flush
    for mode in ("disk", "memory"):
        with SpannIndex.open(tmp_path / "i", mode=mode) as o:
            assert len(o) == 1050
            got = o.search(q, k=10)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


def test_one_writer_per_directory(tmp_path):
    t = table()
    w = SpannIndex.build(t[:500], tmp_path / "i", metric="l2", progress=False)
    with pytest.raises(errors.StoreLockedError):
        SpannIndex.open(tmp_path / "i")
    w.add(t[500:510], np.arange(500, 510))
    r = SpannIndex.open(tmp_path / "i", read_only=True)
    assert r.read_only and len(r) == 510  # a reader replays acknowledged adds
    with pytest.raises(errors.ReadOnlyError):
        r.add(t[600:601], [600])
    with pytest.raises(errors.ReadOnlyError):
        r.delete([1])
    # the CLI's readers work while a writer holds the directory
    from click.testing import CliRunner

    from engramdb.cli_index import index

    out = CliRunner().invoke(index, ["info", str(tmp_path / "i")])
    assert out.exit_code == 0 and "log" in out.output, out.output
    out = CliRunner().invoke(index, ["compact", str(tmp_path / "i")])
    assert out.exit_code != 0 and "locked" in out.output, out.output
    w.close()
    with SpannIndex.open(tmp_path / "i", sync=False) as w2:
        assert len(w2) == 510

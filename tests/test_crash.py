"""kill -9 a writer at random moments: every acknowledged write survives."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np

import engramdb

CHILD = r"""
import sys, numpy as np, engramdb
path, start, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(seed)
# a small checkpoint threshold so kills also land inside checkpoints
s = engramdb.Store(path, dim=16, checkpoint_bytes=64 * 1024)
i = start
while True:
    n = int(rng.integers(1, 40))
    ids = np.arange(i, i + n, dtype=np.uint64)
    s.add(rng.standard_normal((n, 16)), ids=ids, texts=[f"t{j}" for j in ids],
          metadata=[{"j": int(j)} for j in ids])
    print(f"{i} {i + n}", flush=True)   # acknowledged: [i, i + n)
    i += n
    if rng.random() < 0.05:
        s.flush()
"""


def test_sigkill_never_loses_acknowledged_writes(tmp_path):
    path = tmp_path / "s"
    engramdb.Store(path, dim=16).close()
    acked: set[int] = set()
    next_id = 0
    rnd = random.Random(20261125)
    kills = 0
    for round_ in range(60):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(next_id), str(round_)],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(rnd.uniform(0.25, 0.9))  # import takes ~0.2 s: kill mid-stream
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        kills += 1
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2:
                lo, hi = int(parts[0]), int(parts[1])
                acked.update(range(lo, hi))
                next_id = max(next_id, hi)
        next_id += 1000  # never reuse ids of a possibly half-written batch
        info = engramdb.verify(path)  # every checksum holds
        with engramdb.Store(path, read_only=True) as s:
            have = set(s.ids().tolist())
            missing = acked - have
            assert not missing, f"round {round_}: lost {len(missing)} acknowledged ids"
            if acked:
                probe = rnd.choice(sorted(acked))
                r = s.get(probe)
                assert r.text == f"t{probe}" and r.metadata == {"j": probe}
        assert info["count"] == len(have)
    assert kills >= 50 and len(acked) > 1000
    with engramdb.Store(path) as s:  # a writer can take over after all of that
        ids = np.fromiter(acked, dtype=np.uint64)
        assert np.isin(ids, s.ids()).all()

"""Random sequences of add, delete, upsert, search and reopen agree with a
pure-Python model of the store."""

from __future__ import annotations

import shutil
import tempfile

import hypothesis.strategies as st
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import engramdb
from engramdb import Store

DIM = 4
vec = st.lists(st.integers(-8, 8), min_size=DIM, max_size=DIM).filter(lambda v: any(v)).map(
    lambda v: np.array(v, dtype=np.float32)
)
ids = st.integers(0, 30)


class StoreModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.path = self.dir + "/s"
        self.store = Store(self.path, dim=DIM, metric="l2", checkpoint_bytes=2048)
        self.model: dict[int, tuple[np.ndarray, str]] = {}

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(i=ids, v=vec, text=st.text(max_size=8))
    def add(self, i, v, text):
        if i in self.model:
            try:
                self.store.add(v, ids=[i], texts=[text])
                raise AssertionError("duplicate add was accepted")
            except engramdb.DuplicateIdError:
                pass
        else:
            self.store.add(v, ids=[i], texts=[text])
            self.model[i] = (v, text)

    @rule(i=ids, v=vec, text=st.text(max_size=8))
    def upsert(self, i, v, text):
        self.store.upsert(v, ids=[i], texts=[text])
        self.model[i] = (v, text)

    @rule(i=ids)
    def delete(self, i):
        if i in self.model:
            assert self.store.delete([i]) == 1
            del self.model[i]
        else:
            try:
                self.store.delete([i])
                raise AssertionError("deleting an unknown id succeeded")
            except engramdb.NotFoundError:
                pass

    @rule()
    def reopen(self):
        self.store.close()
        self.store = Store(self.path, checkpoint_bytes=2048)

    @rule()
    def flush(self):
        self.store.flush()

    @precondition(lambda self: self.model)
    @rule(q=vec, k=st.integers(1, 5))
    def search(self, q, k):
        got_ids, got_d = self.store.search(q, k=k)
        items = sorted(self.model.items(), key=lambda kv: (float(((kv[1][0] - q) ** 2).sum()), kv[0]))
        want = items[:k]
        assert got_ids.tolist() == [i for i, _ in want]
        np.testing.assert_allclose(got_d, [((v - q) ** 2).sum() for _, (v, _) in want], rtol=1e-5)

    @invariant()
    def same_contents(self):
        assert len(self.store) == len(self.model)
        for i, (v, text) in self.model.items():
            r = self.store.get(i)
            assert r.text == text
            np.testing.assert_array_equal(r.vector, v)


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

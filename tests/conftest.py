from __future__ import annotations

import os
from pathlib import Path

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when
# engramdb.gpu is first imported, and any test module may import it first.
# Without an NVIDIA device, run every kernel in the CPU interpreter.
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MINILM = SHARED / "mixed-minilm-384"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def minilm():
    """The shared real-text MiniLM vectors (base as float32, queries, ground truth)."""
    if not (MINILM / "base.npy").exists():
        pytest.skip("shared data set mixed-minilm-384 not present")
    base = np.load(MINILM / "base.npy").astype(np.float32)
    return base, np.load(MINILM / "queries.npy"), np.load(MINILM / "gt_ids.npy")


@pytest.fixture
def kernel_launches(monkeypatch):
    """``record(module, name)``: from then on, the list of grids that Triton kernel ``module.name`` is
    launched with (to check which kernel a call dispatched to)."""

    def record(module, name):
        launched = []
        real = getattr(module, name)

        class Spy:
            def __getitem__(self, grid):
                launched.append(grid)
                return real[grid]

        monkeypatch.setattr(module, name, Spy())
        return launched

    return record

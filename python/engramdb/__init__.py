"""engramdb: an embedded memory store for LLM agents.

>>> import engramdb, numpy as np
>>> with engramdb.Store("./vectors", dim=4) as store:          # doctest: +SKIP
...     ids = store.add(np.eye(4), texts=["a", "b", "c", "d"])
...     hits, scores = store.search([1, 0, 0, 0], k=2)
>>> mem = engramdb.Memory("./agent-memory")                      # doctest: +SKIP
>>> mem.add("Caroline joined a support group on 7 May", user_id="mel")

The GPU kernels live in ``engramdb.gpu`` (the ``gpu`` extra, with torch);
importing ``engramdb`` never imports torch.
"""

from __future__ import annotations

from . import embedders, errors
from ._native import __version__, get_num_threads, kernel_name, set_num_threads
from .errors import *  # noqa: F403  (the typed exceptions, listed in errors.__all__)
from .lsh import LshIndex
from .memory import Memory, MemoryHit, MemoryItem
from .readers import ContextReader, SummaryReader
from .spann import SpannIndex
from .store import MISSING_ID, Hit, Record, Store, verify

__all__ = [
    "__version__",
    "Store",
    "Record",
    "Hit",
    "LshIndex",
    "SpannIndex",
    "Memory",
    "MemoryHit",
    "MemoryItem",
    "ContextReader",
    "SummaryReader",
    "MISSING_ID",
    "verify",
    "errors",
    "embedders",
    "set_num_threads",
    "get_num_threads",
    "kernel_name",
    *errors.__all__,
]

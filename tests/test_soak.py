"""A short run of the soak (benches/soak.py): 30,000 mixed operations
against the pure-Python model, with disk and RSS bounded. The full run
(1,000,000 operations) and its figures are in RELIABILITY.md."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SOAK = Path(__file__).resolve().parents[1] / "benches" / "soak.py"


def test_short_soak_agrees_with_the_model_and_stays_bounded(tmp_path):
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    res = soak.run(30_000, live=2000, seed=3, out=tmp_path, plot=False, checkpoint_bytes=128 << 10,
                   workdir=tmp_path, progress=False)
    assert res["ops"] >= 30_000
    c = res["counts"]
    for kind in ("add", "upsert", "delete", "link", "unlink", "search", "get", "forget", "flush", "reopen"):
        assert c.get(kind, 0) > 0, kind
    assert c["forget_archived"] > 0 and c["forget_deleted"] > 0
    assert res["checked"]["search_exact"] > 1000
    assert res["disk_bytes"]["bounded"], res["disk_bytes"]
    assert res["rss_bytes"]["bounded"], res["rss_bytes"]
    assert (tmp_path / "soak.json").exists()

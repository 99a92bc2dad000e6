"""The engramdb command line: --version, store info, store verify, demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import engramdb
from engramdb.cli import main


@pytest.fixture
def store_path(tmp_path, rng):
    p = tmp_path / "s"
    with engramdb.Store(p, dim=8) as s:
        s.add(rng.standard_normal((20, 8)), texts=[str(i) for i in range(20)])
        s.flush()
        s.add(rng.standard_normal((5, 8)))
    return p


def test_version_via_the_installed_entry_point():
    exe = Path(sys.executable).parent / "engramdb"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert engramdb.__version__ in out.stdout


def test_info(store_path):
    r = CliRunner().invoke(main, ["store", "info", str(store_path), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["count"] == 25 and info["dim"] == 8 and info["metric"] == "cosine"


def test_verify_ok_and_damaged(store_path):
    r = CliRunner().invoke(main, ["store", "verify", str(store_path)])
    assert r.exit_code == 0 and "ok: 25 records" in r.output
    seg = next(store_path.glob("seg-*.dat"))
    b = bytearray(seg.read_bytes())
    b[len(b) // 2] ^= 0xFF
    seg.write_bytes(bytes(b))
    r = CliRunner().invoke(main, ["store", "verify", str(store_path)])
    assert r.exit_code == 1
    assert "verification failed" in r.output and "seg-" in r.output and "checksum" in r.output


def test_info_of_missing_store_is_a_clean_error(tmp_path):
    r = CliRunner().invoke(main, ["store", "info", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "no engramdb store" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_demo_runs_offline(tmp_path):
    pytest.importorskip("onnxruntime")
    try:
        engramdb.embedders.default_embedder()
    except ImportError as e:
        pytest.skip(f"bundled model not installed: {e}")
    r = CliRunner().invoke(main, ["demo", "--path", str(tmp_path / "demo"), "-k", "1"])
    assert r.exit_code == 0, r.output
    # the nearest memory to the pet question is the one about the dog
    pet = r.output.split("What pet does the user have?")[1].splitlines()[1]
    assert "golden retriever" in pet, r.output
    assert "stored 16 memories" in r.output


def test_store_is_usable_from_numpy_only_after_cli(store_path):
    with engramdb.Store(store_path) as s:
        assert len(s) == 25
        ids, _ = s.search(np.ones(8), k=3)
        assert len(ids) == 3

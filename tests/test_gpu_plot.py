"""benches/gpu_plot.py: which measured rows the GPU picture shows (no GPU, no torch needed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHES = Path(__file__).resolve().parents[1] / "benches"
spec = importlib.util.spec_from_file_location("gpu_plot", BENCHES / "gpu_plot.py")
gpu_plot = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_plot)

SHAPE = gpu_plot.DECODE_SHAPE


def _decode(order, ms, frac, **extra):
    return {"kernel": "kivi_decode", "shape": SHAPE, "bits": 4, "meta_bits": 16, "order": order, "ms": ms,
            "frac_bw": frac, **extra}


def _search(kernel, m, k, ms, frac, queries="q32", **extra):
    return {"kernel": kernel, "queries": queries, "shape": f"n1048576 d384 m{m} k{k}", "ms": ms, "frac_bw": frac,
            **extra}


def test_collect_keeps_the_fastest_row_of_each_kind_across_runs(tmp_path):
    one = {"device": "x", "rows": [
        _decode("mma_w", 0.40, 0.40, sdpa_fp16_ms=0.5, sdpa_frac_bw=1.0),
        _decode("mma_w", 0.35, 0.45),
        _decode("mma", 0.30, 0.2, meta_bits=8),  # 8-bit scales: not the plotted case
        {**_decode("kivi", 0.10, 0.9), "shape": "B1 Hq32 Hkv8 D128 T32768"},  # another shape
        _search("index_fp16_fused", 1, 10, 0.25, 0.8, replay_ms=0.22, replay_frac_bw=0.9,
                torch_topk_fp16_ms=0.3, torch_frac_bw=0.6),
        _search("index_fp16_fused", 1, 10, 0.20, 0.95, queries="q16"),  # fp16 queries: not plotted
    ]}
    two = {"calls": {"call1": {"rows": [
        _decode("mma_w", 0.32, 0.5, sdpa_fp16_ms=0.45, sdpa_frac_bw=1.05),
        _search("index_fp16_fused", 1, 10, 0.26, 0.79),
        _search("index_fp16_parallel", 64, 1024, 0.4, 0.5),
    ]}, "note": "not a run"}}
    paths = []
    for name, data in (("one.json", one), ("two.json", two)):
        (tmp_path / name).write_text(json.dumps(data))
        paths.append(tmp_path / name)
    decode, search, sources = gpu_plot.collect(paths)
    assert sources == ["one.json", "two.json:call1"]
    assert decode == {"mma_w": (0.32, 0.5), "sdpa": (0.45, 1.05)}
    assert search == {("m1 k10", "index_fp16_fused"): (0.25, 0.8), ("m1 k10", "index_fp16_fused:device"): (0.22, 0.9),
                      ("m1 k10", "peer"): (0.3, 0.6), ("m64 k1024", "index_fp16_parallel"): (0.4, 0.5)}


def test_collect_reads_the_stored_h200_runs():
    """The picture in RESULTS.md comes from these rows: the figures the text quotes."""
    decode, search, _ = gpu_plot.collect([BENCHES / "gpu_bench_h200_warps.json"])
    assert round(decode["mma_w"][0] * 1e3) == 315 and round(decode["mma_w"][1], 3) == 0.506
    assert round(search[("m1 k10", "index_fp16_fused")][1], 3) == 0.835
    assert round(search[("m64 k1024", "index_fp16_fused:device")][0] * 1e3) == 594


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "gpu.png"
    assert gpu_plot.main([str(BENCHES / "gpu_bench_h200_warps.json"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

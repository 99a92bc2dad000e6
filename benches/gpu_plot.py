"""Where the GPU kernels stand against issue 6's targets, as a picture, from gpu_bench.py's JSON.

    python benches/gpu_plot.py benches/gpu_bench_h200_warps.json --out benches/gpu.png

Left: the fused decode attention at the GPU-bound shape (B 32 x 8 kv heads x 16K tokens, head size 128,
4-bit codes, fp16 scales): the best measured time of each kernel as a fraction of the card's copy
bandwidth over the bytes it must read, against the 70% target, with torch's SDPA over an fp16 cache beside
it (four times the bytes). Right: top-k search over 1M x 384 fp16 rows for each (queries, k) case: the peer
``torch.topk(X @ q.T)``, and each select per call and as device time (its CUDA graph replayed), against the
80% target. Each bar is the best of the given runs' rows of that kind; its label is the time. Reads either
gpu_bench.py's own output (``{"device", "copy_bandwidth_GBps", "rows"}``) or several such runs kept under
``"calls"`` (as the device sessions stored them). Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import os

DECODE_SHAPE = "B32 Hq32 Hkv8 D128 T16384"
DECODE_KERNELS = {"kivi": "KIVI order", "mma": "mma order", "mma_w": "warps kernel (mma_w)"}
SEARCH_SERIES = {"index_fp16": "torch select", "index_fp16_fused": "fused select",
                 "index_fp16_parallel": "parallel select", "index_fp16_rescore": "rescore select"}
TARGETS = {"decode": 0.70, "search": 0.80}


def runs_of(path):
    """``[(label, run)]``: each gpu_bench.py run in the file."""
    with open(path) as f:
        data = json.load(f)
    name = os.path.basename(path)
    if "rows" in data:
        return [(name, data)]
    calls = data.get("calls") or {k: v for k, v in data.items() if k.startswith("call")}
    return [(f"{name}:{k}", v) for k, v in calls.items() if isinstance(v, dict) and "rows" in v]


def _best(best, key, ms, frac):
    """Keep ``(ms, fraction of the copy bandwidth)`` under ``key`` if it is the fastest seen."""
    if key not in best or ms < best[key][0]:
        best[key] = (ms, frac)


def collect(paths):
    """The best ``(ms, fraction)`` of each kind: decode by kernel order (and the SDPA peer), search by
    (case, series)."""
    decode, search, sources = {}, {}, []
    for path in paths:
        for label, run in runs_of(path):
            sources.append(label)
            for r in run["rows"]:
                if (r.get("kernel") == "kivi_decode" and r.get("shape") == DECODE_SHAPE and r.get("bits") == 4
                        and r.get("meta_bits", 16) == 16 and r.get("order") in DECODE_KERNELS):
                    _best(decode, r["order"], r["ms"], r["frac_bw"])
                    if r.get("sdpa_fp16_ms"):
                        _best(decode, "sdpa", r["sdpa_fp16_ms"], r["sdpa_frac_bw"])
                elif r.get("kernel") in SEARCH_SERIES and r.get("queries") == "q32":
                    case = r["shape"].split(" ", 2)[2]  # "m16 k100"
                    _best(search, (case, r["kernel"]), r["ms"], r["frac_bw"])
                    if r.get("replay_ms"):
                        _best(search, (case, r["kernel"] + ":device"), r["replay_ms"], r["replay_frac_bw"])
                    if r.get("torch_topk_fp16_ms"):
                        _best(search, (case, "peer"), r["torch_topk_fp16_ms"], r["torch_frac_bw"])
    return decode, search, sources


def _case_label(case: str) -> str:
    m, k = (int(part[1:]) for part in case.split())
    return f"{m} {'query' if m == 1 else 'queries'}, k = {k}"


def plot(decode, search, sources, out_png, device="H200"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_d, ax_s) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1, 2.2]})

    # decode: fraction of the copy bandwidth over the bytes each reads
    names, fracs, labels, colors = [], [], [], []
    for order, name in DECODE_KERNELS.items():
        if order in decode:
            ms, frac = decode[order]
            names.append(name)
            fracs.append(frac)
            labels.append(f"{ms * 1e3:.0f} us")
            colors.append("#1f77b4")
    if "sdpa" in decode:
        ms, frac = decode["sdpa"]
        names.append("SDPA, fp16 cache\n(4x the bytes)")
        fracs.append(frac)
        labels.append(f"{ms * 1e3:.0f} us")
        colors.append("#7f7f7f")
    bars = ax_d.bar(range(len(names)), fracs, color=colors)
    ax_d.bar_label(bars, labels, fontsize=8)
    ax_d.set_xticks(range(len(names)), names, fontsize=8, rotation=15)
    ax_d.axhline(TARGETS["decode"], color="red", ls="--", lw=1, label="target 70%")
    ax_d.set_ylabel("fraction of the copy bandwidth")
    ax_d.set_ylim(0, 1.15)
    ax_d.set_title(f"decode attention, 4-bit KV cache\nB 32 x 8 kv heads x 16K tokens, head 128 ({device})",
                   fontsize=9)
    ax_d.legend(fontsize=8, loc="upper left")

    # search: per (m, k) case, the peer and each select per call / device time
    cases = sorted({c for c, _ in search}, key=lambda c: int(c.split()[0][1:]))
    series = [("peer", "torch.topk(X @ q.T)", "#7f7f7f")]
    palette = ["#aec7e8", "#1f77b4", "#2ca02c", "#9467bd"]
    for (kernel, name), color in zip(SEARCH_SERIES.items(), palette):
        series += [(kernel, f"{name}, a call", color), (kernel + ":device", f"{name}, device time", color)]
    series = [s for s in series if any((c, s[0]) in search for c in cases)]
    width = 0.8 / max(1, len(series))
    for j, (key, name, color) in enumerate(series):
        xs, ys, ls = [], [], []
        for i, case in enumerate(cases):
            if (case, key) not in search:
                continue
            ms, frac = search[(case, key)]
            xs.append(i + (j - (len(series) - 1) / 2) * width)
            ys.append(frac)
            ls.append(f"{ms * 1e3:.0f}")
        bars = ax_s.bar(xs, ys, width, color=color, label=name,
                        hatch="//" if key.endswith(":device") else None, edgecolor="white")
        ax_s.bar_label(bars, ls, fontsize=6, rotation=90, padding=2)
    ax_s.set_xticks(range(len(cases)), [_case_label(c) for c in cases], fontsize=8)
    ax_s.axhline(TARGETS["search"], color="red", ls="--", lw=1, label="target 80%")
    ax_s.set_ylim(0, 1.15)
    ax_s.set_title(f"top-k search, 1M x 384 fp16 rows, fp32 queries ({device}); labels: us", fontsize=9)
    ax_s.legend(fontsize=7, ncol=2, loc="upper right")
    fig.text(0.01, 0.01, "best of: " + ", ".join(sources), fontsize=6, color="#555555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out_png, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="gpu_bench.py JSON files")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu.png"))
    ap.add_argument("--device", default="H200", help="the card, for the titles")
    args = ap.parse_args(argv)
    decode, search, sources = collect(args.runs)
    if not decode and not search:
        print("gpu_plot: no decode or search rows of the plotted kinds in", args.runs)
        return 1
    plot(decode, search, sources, args.out, args.device)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

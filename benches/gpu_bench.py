"""GPU timings of engramdb.gpu kernels as a fraction of measured memory bandwidth.

* fused KIVI decode attention (4- and 2-bit packed cache + fp16 window) against torch SDPA over an
  fp16 cache of the same length;
* brute-force top-k search over fp16 and int8 matrices against ``torch.topk(X @ q.T)``.

Bandwidth is measured first with a device-to-device copy; each kernel's figure is
(bytes it must read) / (time from ``triton.testing.do_bench``) / (copy bandwidth). Outputs are
checked against the torch references before anything is timed. Targets (issue 6): decode attention
>= 70% and search >= 80% of the copy bandwidth.

    python benches/gpu_bench.py [--quick] [--json OUT]

Without CUDA it prints that it needs a GPU and exits 0.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# a source checkout without the native module built: import python/engramdb/gpu on its own as `gpu`
sys.path.append(os.path.join(os.path.dirname(HERE), "python", "engramdb"))


def _matmul_topk(x, q, k):
    import torch

    return torch.topk(x @ q.T, k, dim=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu_bench: torch is not installed; it needs torch, triton and a CUDA GPU. Nothing measured.")
        return 0
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("gpu_bench: needs a CUDA GPU (none found, or TRITON_INTERPRET is set). Nothing measured.")
        return 0
    import triton.testing

    try:
        import engramdb.gpu as G
    except Exception:  # no native module yet: the gpu package stands alone
        import gpu as G
    kv_quant, search_topk, search_topk_ref = G.kv_quant, G.search_topk, G.search_topk_ref
    quantize_rows_int8 = G.quantize_rows_int8
    kivi_decode_attention, kivi_decode_attention_ref = G.kivi_decode_attention, G.kivi_decode_attention_ref

    dev = "cuda"
    name = torch.cuda.get_device_name()
    rows = []

    def bench(fn, *args, **kwargs):
        return triton.testing.do_bench(functools.partial(fn, *args, **kwargs), warmup=25, rep=200)  # milliseconds

    # ---- bandwidth: device-to-device copy of 1 GiB (read + write)
    src = torch.empty(1 << 29, dtype=torch.float16, device=dev)
    dst = torch.empty_like(src)
    ms = bench(dst.copy_, src)
    bw = 2 * src.numel() * 2 / (ms * 1e-3)
    del src, dst
    print(f"device: {name}; copy bandwidth {bw / 1e9:.0f} GB/s")

    # ---- decode attention
    shapes = [(1, 32, 8, 128, 32768), (8, 32, 8, 128, 8192)]
    if not args.quick:
        shapes += [(16, 32, 8, 128, 4096), (4, 9, 3, 64, 16384)]
    for b, hq, hkv, d, t in shapes:
        window = 64
        tq = t - window
        q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.float16)
        k = torch.randn(b, hkv, t, d, device=dev, dtype=torch.float16)
        v = torch.randn(b, hkv, t, d, device=dev, dtype=torch.float16)
        sdpa_ms = bench(torch.nn.functional.scaled_dot_product_attention, q, k, v, enable_gqa=True)
        sdpa_bytes = 2 * k.numel() * 2
        for bits in (4, 2):
            kq = kv_quant.quantize_keys(k[:, :, :tq], bits, 32)
            vq = kv_quant.quantize_values(v[:, :, :tq], bits, 32)
            kr, vr = k[:, :, tq:].contiguous(), v[:, :, tq:].contiguous()
            out = kivi_decode_attention(q, kq, vq, kr, vr)
            ref = kivi_decode_attention_ref(q[:, :, 0], kq, vq, kr, vr)
            err = (out[:, :, 0].float() - ref.float()).abs().max().item()
            assert err < 1e-2, f"decode attention differs from the reference by {err}"
            ms = bench(kivi_decode_attention, q, kq, vq, kr, vr)
            nbytes = kq.nbytes() + vq.nbytes() + 2 * kr.numel() * 2 + q.numel() * 2
            row = {"kernel": "kivi_decode", "bits": bits, "shape": f"B{b} Hq{hq} Hkv{hkv} D{d} T{t}",
                   "ms": ms, "GB/s": nbytes / ms / 1e6, "frac_bw": nbytes / (ms * 1e-3) / bw,
                   "sdpa_fp16_ms": sdpa_ms, "sdpa_frac_bw": sdpa_bytes / (sdpa_ms * 1e-3) / bw}
            rows.append(row)
            print(f"decode {row['shape']:32s} {bits}-bit: {ms * 1e3:8.1f} us  {row['frac_bw']:5.1%} of copy bw | "
                  f"SDPA fp16 {sdpa_ms * 1e3:8.1f} us ({row['sdpa_frac_bw']:5.1%}); speedup {sdpa_ms / ms:.2f}x")

    # ---- top-k search
    n, d = (1 << 20), 384
    x16 = torch.randn(n, d, device=dev, dtype=torch.float16)
    x16 = x16 / x16.float().norm(dim=1, keepdim=True).half()
    codes, scale = quantize_rows_int8(x16)
    cases = [(1, 10), (16, 100), (64, 1024)] if not args.quick else [(16, 100)]
    for m, k_ in cases:
        q = torch.randn(m, d, device=dev)
        q = q / q.norm(dim=1, keepdim=True)
        s, i = search_topk(q, x16[:100000], k_)
        rs, ri = search_topk_ref(q.cpu(), x16[:100000].cpu(), k_)
        agree = (i.cpu() == ri).float().mean().item()
        assert agree > 0.99, f"search ids agree with the reference on only {agree:.2%}"
        q16 = q.half()
        base_ms = bench(_matmul_topk, x16, q16, k_)
        base_bytes = x16.numel() * 2
        for kind, x, xs in (("fp16", x16, None), ("int8", codes, scale)):
            ms = bench(search_topk, q, x, k_, base_scale=xs)
            nbytes = x.numel() * x.element_size() + (xs.numel() * 4 if xs is not None else 0)
            row = {"kernel": f"search_{kind}", "shape": f"n{n} d{d} m{m} k{k_}", "ms": ms,
                   "GB/s": nbytes / ms / 1e6, "frac_bw": nbytes / (ms * 1e-3) / bw,
                   "torch_topk_fp16_ms": base_ms, "torch_frac_bw": base_bytes / (base_ms * 1e-3) / bw}
            rows.append(row)
            print(f"search {kind} {row['shape']:26s}: {ms * 1e3:8.1f} us  {row['frac_bw']:5.1%} of copy bw | "
                  f"torch.topk(X@q) fp16 {base_ms * 1e3:8.1f} us ({row['torch_frac_bw']:5.1%})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "copy_bandwidth_GBps": bw / 1e9, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

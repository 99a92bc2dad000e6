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
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
# a source checkout without the native module built: import python/engramdb/gpu on its own as `gpu`
sys.path.append(os.path.join(os.path.dirname(HERE), "python", "engramdb"))


def _copy(qt):
    """A QuantizedTensor with its own copies of the tensors."""
    import dataclasses

    return dataclasses.replace(qt, **{f: getattr(qt, f).clone() for f in ("packed", "scale", "minimum", "sup")
                                      if getattr(qt, f) is not None})


def _matmul_topk(x, q, k):
    import torch

    return torch.topk(x @ q.T, k, dim=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--kernels", default="decode,search",
                    help="comma-separated subset of: decode, search, profile (the torch profiler's view of a search)")
    ap.add_argument("--sweep-kivi", action="store_true",
                    help="also sweep the KIVI-order decode kernel's prefetch, stages, warps and unpacking, and the "
                         "search's chunk and tile sizes (measured before; off by default to keep a device call short)")
    ap.add_argument("--decode-shapes", type=int, default=0,
                    help="time only the first N decode shapes (the GPU-bound one first)")
    ap.add_argument("--configs", help="decode: only these configurations (a JSON list of the dicts below), 4-bit "
                                      "caches with 16-bit scales only (a short device call)")
    ap.add_argument("--smoke", action="store_true",
                    help="run every step on tiny shapes on the CPU (Triton interpreter, wall-clock timer): checks "
                         "the script, measures nothing")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu_bench: torch is not installed; it needs torch, triton and a CUDA GPU. Nothing measured.")
        return 0
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before engramdb.gpu decorates its kernels
    elif not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("gpu_bench: needs a CUDA GPU (none found, or TRITON_INTERPRET is set). Nothing measured.")
        return 0
    import triton.testing

    try:
        import engramdb.gpu as G
    except Exception:  # no native module yet: the gpu package stands alone
        import gpu as G
    kv_quant, search_topk_ref = G.kv_quant, G.search_topk_ref
    # the searches are timed without the queries' NaN check (its host wait would be in every figure, and the
    # figures before it existed had none); its cost is a row of its own, "index_fp16_checked"
    search_topk = functools.partial(G.search_topk, check_finite=False)
    quantize_rows_int8 = G.quantize_rows_int8
    search_mod = sys.modules[G.__name__ + ".search"]
    da_mod = sys.modules[G.__name__ + ".decode_attention"]
    BruteForceIndex = functools.partial(G.BruteForceIndex, check_finite=False)
    kivi_decode_attention, kivi_decode_attention_ref = G.kivi_decode_attention, G.kivi_decode_attention_ref

    dev = "cpu" if args.smoke else "cuda"
    name = "cpu (smoke run)" if args.smoke else torch.cuda.get_device_name()
    rows = []

    def bench(fn, *args, **kwargs):
        if dev == "cpu":
            t0 = time.perf_counter()
            fn(*args, **kwargs)
            return (time.perf_counter() - t0) * 1e3
        return triton.testing.do_bench(functools.partial(fn, *args, **kwargs), warmup=25, rep=100,
                                       return_mode="median")  # milliseconds

    # ---- bandwidth: device-to-device copy of 1 GiB (read + write)
    src = torch.randn(1 << (12 if args.smoke else 29), dtype=torch.float16, device=dev)
    dst = torch.empty_like(src)
    ms = bench(dst.copy_, src)
    bw = 2 * src.numel() * 2 / (ms * 1e-3)
    del src, dst
    print(f"device: {name}; torch {torch.__version__}, triton {triton.__version__}; copy bandwidth {bw / 1e9:.0f} GB/s")

    def graph_ms(calls):
        """Device time per call of ``calls`` (zero-argument callables, each over its own buffers) replayed
        as one CUDA graph: no host launch cost in the figure. ``None`` on the CPU."""
        if dev == "cpu":
            return None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and warm the allocator outside the capture
            for call in calls:
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        return bench(graph.replay) / len(calls)

    def decode_section():
        # ---- decode attention: the shipped defaults plus a sweep of the kernel's tuning knobs (keyword
        # arguments of kivi_decode_attention; "splits": "x2" / "/2" = twice / half the default split count, or
        # a count);
        # the first is the default, the best of the sweep is reported beside it; "expand" was the default
        # unpacking before "join"
        # "order": "mma": the cache re-packed in tensor-core operand order (kv_quant.to_mma_order, what
        # QuantizedKVCache stores for an fp16 model with the fused attention): its own kernel, no
        # shared-memory staging of the K and V tiles; "mma_w": values in the order of the kernel that gives
        # each warp its own 16 tokens of a tile (no cross-warp reduction a tile)
        # (the KIVI-order sweeps of prefetch, stages, 8 warps and "expand" ran on an H100 on 2026-11-26 and are
        # in RESULTS.md; --sweep-kivi runs them again)
        # (the queries-in-registers on/off rows of the mma kernel ran on an H100 and an H200 on 2026-11-27 and
        # are in RESULTS.md: the default picks the better)
        # "mma_w" knobs (decode_attention.WARPS_*, whose values are the defaults): "key_meta" ("registers" /
        # "shared"), "meta" ("ahead" / "tile"), "swap" (P V as (V^T P^T)^T), "asm" (pairs dequantized by
        # inline PTX), "maxnreg" (a register cap), "swap_qk" (scores as K Q^T), "movm" (its P^T by movmatrix),
        # "unroll2" (the loop unrolled by two), "fold" (the keys' codes as fp16 subnormals, scales folded into Q^T),
        # "stages" (Triton's pipeline depth: most of the loop's loads as cp.async copies 1-2 tiles further ahead)
        # (the H200's rows of 2026-11-27 in RESULTS.md: key_meta "shared" + meta "ahead" + swap, 315 us; the
        # others 324-543 us; swap_qk and fold came after them and are the defaults untimed: {"swap_qk": False}
        # is the timed default of then, with the shift-once unpack)
        mma = [{"order": "mma"}, {"order": "mma", "block_t": 128}, {"order": "mma", "splits": "x2"},
               {"order": "mma_w"}, {"order": "mma_w", "splits": "x2"}, {"order": "mma_w", "splits": "/2"},
               {"order": "mma_w", "meta": "tile"}, {"order": "mma_w", "movm": True},
               {"order": "mma_w", "swap_qk": False}, {"order": "mma_w", "swap_qk": False, "splits": 2},
               {"order": "mma_w", "key_meta": "registers"}, {"order": "mma_w", "swap_qk": False, "maxnreg": 168},
               {"order": "mma_w", "unroll2": True}, {"order": "mma_w", "fold": False},
               {"order": "mma_w", "fold": False, "unroll2": True}, {"order": "mma_w", "stages": 2},
               {"order": "mma_w", "stages": 3}]
        kivi_sweep = [{"prefetch": "meta"}, {"prefetch": "all", "num_stages": 2},
                      {"prefetch": "all", "block_t": 128, "num_warps": 8}, {"prefetch": "none"},
                      {"unpack": "expand", "prefetch": "none"}] if args.sweep_kivi else []
        configs = [{}, *mma, *kivi_sweep, {"splits": "x2"}]
        warps_defaults = {var: getattr(da_mod, var) for var in dir(da_mod) if var.startswith("WARPS_")}
        warps_knobs = {  # configuration key: (decode_attention variable, its value from the key's)
            "key_meta": ("WARPS_KEY_META_IN_REGISTERS", lambda v: v == "registers"),  # each thread's / shared
            "meta": ("WARPS_META_AHEAD", lambda v: v == "ahead"),  # scales a tile ahead / at their own tile
            "swap": ("WARPS_SWAP_PV", bool),  # P V as (V^T P^T)^T
            "asm": ("WARPS_ASM", bool),  # code pairs dequantized by inline PTX
            "maxnreg": ("WARPS_MAXNREG", lambda v: v),  # a register cap
            "swap_qk": ("WARPS_SWAP_QK", bool),  # the scores as K Q^T
            "movm": ("WARPS_MOVMATRIX", bool),  # with swap_qk: P^T transposed by movmatrix
            "unroll2": ("WARPS_UNROLL2", bool),  # the loop unrolled by two, two prefetch buffers
            "fold": ("WARPS_FOLD_KEYS", bool),  # keys as subnormal codes, scales folded into Q^T
            "stages": ("WARPS_NUM_STAGES", int),  # Triton's pipeline depth: loads as cp.async, tiles ahead
        }
        if args.quick:
            configs = configs[:2] + configs[-1:]
        if args.configs:
            configs = json.loads(args.configs)
        # the GPU-bound shape first: it is the figure that counts, and a time limit must not cost it
        shapes = [] if args.quick else [(32, 32, 8, 128, 16384)]
        shapes += [(1, 32, 8, 128, 32768), (8, 32, 8, 128, 8192), (4, 9, 3, 64, 16384)]
        if args.decode_shapes:
            shapes = shapes[:args.decode_shapes]
        if args.smoke:
            shapes = [(1, 4, 2, 64, 64 + 128 + 32)]
            configs = [configs[0], mma[0], mma[1], mma[3], mma[6], mma[9], mma[10], mma[11], configs[-1]]
        for si, (b, hq, hkv, d, t) in enumerate(shapes):
            window = 64
            tq = t - window
            q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.float16)
            k = torch.randn(b, hkv, t, d, device=dev, dtype=torch.float16)
            v = torch.randn(b, hkv, t, d, device=dev, dtype=torch.float16)
            sdpa_ms = bench(torch.nn.functional.scaled_dot_product_attention, q, k, v, enable_gqa=True)
            sdpa_bytes = 2 * k.numel() * 2
            shape = f"B{b} Hq{hq} Hkv{hkv} D{d} T{t}"
            for bits in (4,) if args.configs else (4, 2):
                for meta_bits in (16,) if args.configs else (16, 8):
                    kq = kv_quant.quantize_keys(k[:, :, :tq], bits, 32, meta_bits=meta_bits)
                    vq = kv_quant.quantize_values(v[:, :, :tq], bits, 32, meta_bits=meta_bits)
                    kr, vr = k[:, :, tq:].contiguous(), v[:, :, tq:].contiguous()
                    ref = kivi_decode_attention_ref(q[:, :, 0], kq, vq, kr, vr)
                    nbytes = kq.nbytes() + vq.nbytes() + 2 * kr.numel() * 2 + q.numel() * 2
                    kqm, vqm = kv_quant.to_mma_order(kq), kv_quant.to_mma_order(vq)
                    # values for the kernel with a warp per 16 tokens (4-bit, head size 64 or 128; keys as mma)
                    vqw = (kv_quant.to_mma_order(vq, warps=True) if bits == 4 and d in (64, 128) and meta_bits == 16
                           else None)
                    short = [configs[0], mma[0], mma[3]]  # the defaults of each order
                    if meta_bits == 16 and (si == 0 or args.configs):
                        todo = configs
                    else:  # (8-bit scales: no warps kernel, see decode_attention.warps_kernel_takes)
                        todo = short + [mma[8]] if meta_bits == 16 else short[:2]
                    for cfg in todo:
                        order = cfg.get("order", "kivi")
                        if order == "mma_w" and vqw is None:
                            continue
                        ck, cv = {"mma": (kqm, vqm), "mma_w": (kqm, vqw)}.get(order, (kq, vq))
                        kw = {"block_t": 64, "num_warps": 4, "unpack": "join", "num_stages": None, "prefetch": "all",
                              "num_splits": None, "q_in_registers": None}
                        kw.update({key: val for key, val in cfg.items()
                                   if key not in ("splits", "order", *warps_knobs)})
                        # the warps kernel's knobs: the module's defaults unless the configuration names one
                        for var, val in warps_defaults.items():
                            setattr(da_mod, var, val)
                        for key, (var, value_of) in warps_knobs.items():
                            if key in cfg:
                                setattr(da_mod, var, value_of(cfg[key]))
                        sp = cfg.get("splits")
                        if isinstance(sp, int):
                            kw["num_splits"] = sp
                        elif sp is not None:  # relative to the split count the default rule picks
                            kivi_decode_attention(q, ck, cv, kr, vr, **kw)
                            ns = da_mod.LAST_LAUNCH["num_splits"]
                            kw["num_splits"] = max(1, min(ns * 2 if sp == "x2" else ns // 2, triton.cdiv(t, 32)))
                        bt, nw, ex, ns, st = kw["block_t"], kw["num_warps"], kw["unpack"], kw["num_splits"], kw["num_stages"]
                        try:  # one configuration failing must not cost the others' rows
                            out = kivi_decode_attention(q, ck, cv, kr, vr, **kw)
                            launch = dict(da_mod.LAST_LAUNCH)  # the split count and occupancy that ran
                            err = (out[:, :, 0].float() - ref.float()).abs().max().item()
                            assert err < 1e-2, f"decode attention differs from the reference by {err}"
                            ms = bench(kivi_decode_attention, q, ck, cv, kr, vr, **kw)
                        except Exception as exc:
                            if not cfg:
                                raise
                            print(f"decode {shape} {bits}b m{meta_bits} {cfg}: FAILED {exc!r}", flush=True)
                            continue
                        row = {"kernel": "kivi_decode", "bits": bits, "meta_bits": meta_bits, "shape": shape, "order": order,
                               "block_t": bt, "num_warps": nw, "unpack": ex, "num_splits": ns, "num_stages": st,
                               "prefetch": kw["prefetch"], "q_in_registers": kw["q_in_registers"], "splits_rule": sp,
                               "key_meta": None if order != "mma_w" else (
                                   "registers" if da_mod.WARPS_KEY_META_IN_REGISTERS else "shared"),
                               "asm": da_mod.WARPS_ASM if order == "mma_w" else None,
                               "meta": None if order != "mma_w" else ("ahead" if da_mod.WARPS_META_AHEAD else "tile"),
                               "swap_pv": da_mod.WARPS_SWAP_PV if order == "mma_w" else None,
                               "maxnreg": da_mod.WARPS_MAXNREG if order == "mma_w" else None,
                               "swap_qk": da_mod.WARPS_SWAP_QK if order == "mma_w" else None,
                               "movm": da_mod.WARPS_MOVMATRIX if order == "mma_w" else None,
                               "unroll2": da_mod.WARPS_UNROLL2 if order == "mma_w" else None,
                               "fold": da_mod.WARPS_FOLD_KEYS if order == "mma_w" else None,
                               "stages": da_mod.WARPS_NUM_STAGES if order == "mma_w" else None,
                               "splits_run": launch.get("num_splits"), "programs_per_sm": launch.get("programs_per_sm"),
                               "ms": ms, "bytes": nbytes,
                               "GB/s": nbytes / ms / 1e6, "frac_bw": nbytes / (ms * 1e-3) / bw,
                               "sdpa_fp16_ms": sdpa_ms, "sdpa_frac_bw": sdpa_bytes / (sdpa_ms * 1e-3) / bw, "max_err": err}
                        if cfg in (configs[0], configs[1], mma[3]) and bits == 4 and meta_bits == 16 and dev == "cuda":
                            # the default again, as a graph over copies of the cache (together at least 4x the
                            # L2 cache, so replays read memory): the kernels' time without the host's
                            l2 = torch.cuda.get_device_properties(0).L2_cache_size
                            copies = max(1, min(16, -(-4 * l2 // nbytes)))
                            caches = [(ck, cv)] + [(_copy(ck), _copy(cv)) for _ in range(copies - 1)]
                            try:  # (never run on a GPU yet: a failure here must not cost the other rows)
                                row["graph_ms"] = graph_ms([functools.partial(kivi_decode_attention, q, ck, cv, kr, vr,
                                                                              **kw) for ck, cv in caches])
                                row["graph_frac_bw"] = nbytes / (row["graph_ms"] * 1e-3) / bw
                                row["graph_copies"] = copies
                            except Exception as exc:
                                print(f"graph timing failed: {exc!r}", flush=True)
                            del caches
                        rows.append(row)
                        print(f"decode {shape:28s} {bits}b m{meta_bits:<2d} {order:4s} bt{bt:<3d} w{nw} {ex:6s} s{sp} st{st} "
                              f"pf-{kw['prefetch']} qr-{kw['q_in_registers']}"
                              + (f" km-{row['key_meta']} asm-{row['asm']} meta-{row['meta']} "
                                 f"reg-{row['maxnreg']} swap-{row['swap_pv']} qk-{row['swap_qk']} movm-{row['movm']} "
                                 f"u2-{row['unroll2']} fold-{row['fold']}"
                                 if order == "mma_w" else "")
                              + f" [{row['splits_run']} splits, {row['programs_per_sm']}/SM]"
                              + ": "
                              f"{ms * 1e3:8.1f} us {row['frac_bw']:6.1%} bw | SDPA fp16 {sdpa_ms * 1e3:8.1f} us "
                              f"({row['sdpa_frac_bw']:5.1%}); {sdpa_ms / ms:.2f}x"
                              + (f" | graph x{row['graph_copies']} {row['graph_ms'] * 1e3:8.1f} us "
                                 f"{row['graph_frac_bw']:6.1%}" if "graph_ms" in row else ""), flush=True)
            del q, k, v, kq, vq, kqm, vqm, vqw, kr, vr
            torch.cuda.empty_cache()

    def search_section():
        # ---- top-k search over 1M x 384 unit rows: defaults plus chunk/tile sweep, fp32 and fp16 queries
        n, d = (1 << 20, 384) if not args.smoke else (3000, 48)
        x16 = torch.randn(n, d, device=dev, dtype=torch.float16)
        x16 = (x16.float() / x16.float().norm(dim=1, keepdim=True)).half()
        codes, scale = quantize_rows_int8(x16)
        cases = [(1, 10), (16, 100), (64, 1024)] if not args.quick else [(16, 100)]
        if args.smoke:
            cases = [(2, 10)]
        sweeps = [(None, None), (None, (64, 4)), (None, (256, 8)), (None, (128, 8))]
        if not args.sweep_kivi:
            sweeps = sweeps[:1]
        if args.quick:
            sweeps = sweeps[:2]
        for m, k_ in cases:
            q = torch.randn(m, d, device=dev)
            q = q / q.norm(dim=1, keepdim=True)
            s, i = search_topk(q, x16[:100000], k_, chunk_rows=1024 if args.smoke else None)
            rs, ri = search_topk_ref(q.cpu(), x16[:100000].cpu(), k_)
            agree = (i.cpu() == ri).float().mean().item()
            assert agree > 0.99, f"search ids agree with the reference on only {agree:.2%}"
            # int8 rows too: with up to 16 queries they take their own stage-1 kernel
            s8, i8 = search_topk(q, codes[:100000], k_, base_scale=scale[:100000],
                                 chunk_rows=1024 if args.smoke else None)
            rs8, ri8 = search_topk_ref(q.cpu(), codes[:100000].cpu(), k_, base_scale=scale[:100000].cpu())
            agree = (i8.cpu() == ri8).float().mean().item()
            assert agree > 0.99, f"int8 search ids agree with the reference on only {agree:.2%}"
            q16 = q.half()
            # the stage-1 kernel alone over all rows (scores written, no top-k): what the top-k adds on top
            for kind, x, xs in (("fp16", x16, None), ("int8", codes, scale)):
                ms = bench(search_mod._chunk_scores_triton, q, x, xs, None, False, search_mod._TILE)
                nbytes = x.numel() * x.element_size() + (xs.numel() * 4 if xs is not None else 0)
                rows.append({"kernel": f"scores_only_{kind}", "queries": "q32", "shape": f"n{n} d{d} m{m}", "ms": ms,
                             "bytes": nbytes, "frac_bw": nbytes / (ms * 1e-3) / bw})
                print(f"stage-1 kernel only {kind} m{m}: {ms * 1e3:8.1f} us {rows[-1]['frac_bw']:6.1%} bw", flush=True)
                if kind == "int8" and m <= 16:  # the fragment kernel with its words two steps ahead
                    search_mod.INT8_STEPS_AHEAD, saved = 2, search_mod.INT8_STEPS_AHEAD
                    try:
                        ms = bench(search_mod._chunk_scores_triton, q, x, xs, None, False, search_mod._TILE)
                    finally:
                        search_mod.INT8_STEPS_AHEAD = saved
                    rows.append({**rows[-1], "kernel": "scores_only_int8_ahead2", "ms": ms,
                                 "frac_bw": nbytes / (ms * 1e-3) / bw})
                    print(f"stage-1 kernel only int8 m{m}, two steps ahead: {ms * 1e3:8.1f} us "
                          f"{rows[-1]['frac_bw']:6.1%} bw", flush=True)
            base_ms = bench(_matmul_topk, x16, q16, k_)
            base_bytes = x16.numel() * 2
            for kind, x, xs in (("fp16", x16, None), ("int8", codes, scale)):
                for qkind, qq in (("q32", q), ("q16", q16)):
                    for chunk, tile in sweeps if qkind == "q32" else sweeps[:1]:
                        ms = bench(search_topk, qq, x, k_, base_scale=xs, chunk_rows=chunk, tile=tile)
                        nbytes = x.numel() * x.element_size() + (xs.numel() * 4 if xs is not None else 0)
                        row = {"kernel": f"search_{kind}", "queries": qkind, "shape": f"n{n} d{d} m{m} k{k_}",
                               "chunk_rows": chunk, "tile": tile, "ms": ms, "bytes": nbytes,
                               "GB/s": nbytes / ms / 1e6, "frac_bw": nbytes / (ms * 1e-3) / bw,
                               "torch_topk_fp16_ms": base_ms, "torch_frac_bw": base_bytes / (base_ms * 1e-3) / bw}
                        rows.append(row)
                        print(f"search {kind} {qkind} {row['shape']:24s} chunk {chunk} tile {tile}: {ms * 1e3:8.1f} us "
                              f"{row['frac_bw']:6.1%} bw | torch.topk(X@q) fp16 {base_ms * 1e3:8.1f} us "
                              f"({row['torch_frac_bw']:5.1%})", flush=True)
                    # the same search through BruteForceIndex: a CUDA graph replayed per search, with the torch
                    # selection, select="fused" (one kernel: a threshold from the tile maxima, the rows that reach
                    # it, their top k), select="parallel" (the same over many programs a query) and
                    # select="rescore" (parallel, over scores from the fp32 queries' high halves alone, the rows
                    # near the threshold rescored; with fp16 queries it is "parallel")
                    want = search_topk(qq, x, k_, base_scale=xs)
                    for sel in ("torch", "fused", "parallel", "rescore"):
                        try:  # (the parallel select has not run on a GPU yet: a failure must not cost the rest)
                            index = BruteForceIndex(x, base_scale=xs, select=sel)
                            got = index.search(qq, k_)
                            if sel == "rescore" and qkind == "q32":  # its exact scores are summed in another order:
                                # the same to ~1e-7, so adjacent near-ties may swap
                                torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
                                same = (got[1] == want[1]).float().mean().item()
                                assert same > 0.99, f"BruteForceIndex(rescore) ids agree on only {same:.2%}"
                            else:
                                assert torch.equal(got[1], want[1]), f"BruteForceIndex({sel}) differs from search_topk"
                            ms = bench(index.search, qq, k_)
                        except Exception as exc:
                            if sel == "torch":
                                raise
                            print(f"select={sel} failed: {exc!r}", flush=True)
                            continue
                        # the search's device time: its recorded graph replayed back to back, so the host's
                        # share of a call (checks, the graph launch, the wait on the tie flags) is not in it
                        replay_ms = None
                        if dev == "cuda" and index.recorded_shapes:
                            graph = next(iter(index._graphs.values()))[0]
                            replay_ms = bench(lambda g=graph: [g.replay() for _ in range(10)]) / 10
                        row = {"kernel": f"index_{kind}" + ("" if sel == "torch" else f"_{sel}"), "queries": qkind,
                               "replay_ms": replay_ms,
                               "replay_frac_bw": nbytes / (replay_ms * 1e-3) / bw if replay_ms else None,
                               "shape": f"n{n} d{d} m{m} k{k_}", "select": sel,
                               "graph": bool(index.recorded_shapes), "ms": ms, "bytes": nbytes,
                               "GB/s": nbytes / ms / 1e6, "frac_bw": nbytes / (ms * 1e-3) / bw,
                               "torch_topk_fp16_ms": base_ms, "torch_frac_bw": base_bytes / (base_ms * 1e-3) / bw}
                        rows.append(row)
                        print(f"index  {kind} {qkind} {row['shape']:24s} graph {row['graph']} select {sel}: "
                              f"{ms * 1e3:8.1f} us {row['frac_bw']:6.1%} bw"
                              + (f" | device time (replays) {replay_ms * 1e3:8.1f} us {row['replay_frac_bw']:6.1%}"
                                 if replay_ms else ""), flush=True)
                        del index
                    if kind == "fp16" and qkind == "q32":  # the default search, the queries checked for NaN
                        # (GPU queries; numpy queries, copied in at each search and checked on the CPU before
                        # the copy, beside the same unchecked: the difference is the check's cost alone)
                        qn = qq.cpu().numpy()
                        for name, queries, checked, what in (
                                ("index_fp16_checked", qq, True, "queries checked"),
                                ("index_fp16_numpy", qn, False, "numpy queries"),
                                ("index_fp16_numpy_checked", qn, True, "numpy queries, checked")):
                            index = G.BruteForceIndex(x, check_finite=checked)
                            index.search(queries, k_)
                            ms = bench(index.search, queries, k_)
                            rows.append({"kernel": name, "queries": qkind, "shape": f"n{n} d{d} m{m} k{k_}",
                                         "select": index.select_for(k_, qq), "ms": ms, "bytes": nbytes,
                                         "frac_bw": nbytes / (ms * 1e-3) / bw})
                            print(f"index  fp16 q32 {rows[-1]['shape']:24s} default, {what}: {ms * 1e3:8.1f} us "
                                  f"{rows[-1]['frac_bw']:6.1%} bw", flush=True)
                            del index

    def profile_section():
        # ---- where a 1M-row search's time goes: every kernel of one eager search_topk call and of one
        # BruteForceIndex (graph) search, from the torch profiler (device time per kernel name)
        from torch.profiler import ProfilerActivity, profile

        n, d = (1 << 20, 384) if not args.smoke else (3000, 48)
        x16 = torch.randn(n, d, device=dev, dtype=torch.float16)
        for m, k_ in ((1, 10), (16, 100)):
            q = torch.randn(m, d, device=dev)
            index = BruteForceIndex(x16)
            calls = (("search_topk", functools.partial(search_topk, q, x16, k_)),
                     ("index", functools.partial(index.search, q, k_)))
            for sel in ("fused", "parallel"):
                other = BruteForceIndex(x16, select=sel)
                calls += ((f"index select={sel}", functools.partial(other.search, q, k_)),)
            for label, fn in calls:
                for _ in range(3):
                    fn()
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
                with profile(activities=acts) as prof:
                    for _ in range(10):
                        fn()
                    if dev == "cuda":
                        torch.cuda.synchronize()
                print(f"\nprofile {label} m{m} k{k_} (10 calls)")
                print(prof.key_averages().table(sort_by="cuda_time_total" if dev == "cuda" else "cpu_time_total",
                                                row_limit=22, max_name_column_width=60))

    for name, section in (("decode", decode_section), ("search", search_section), ("profile", profile_section)):
        if name not in set(args.kernels.split(",")):
            continue
        try:
            section()
        except Exception:  # report and go on: the other kernel's figures still count
            traceback.print_exc()
            print(f"{name}: FAILED (above); its rows are missing", flush=True)

    # ---- summary: default configuration and best of the sweep per case
    print("\nsummary (fraction of copy bandwidth; default config, best config)")
    groups: dict = {}
    for r in rows:
        key = (r["kernel"], r.get("order"), r.get("bits"), r.get("meta_bits"), r.get("queries"), r["shape"])
        groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        best = max(rs, key=lambda r: r["frac_bw"])
        dflt = next((r for r in rs if r.get("block_t", 64) == 64 and r.get("num_warps", 4) == 4
                     and r.get("unpack", "join") == "join" and r.get("num_splits") is None
                     and r.get("num_stages") is None and r.get("prefetch", "all") == "all"
                     and r.get("chunk_rows") is None and r.get("tile") is None and r.get("q_in_registers") is None),
                    rs[0])
        peer = rs[0].get("sdpa_frac_bw", rs[0].get("torch_frac_bw", float("nan")))
        cfg = {c: best[c] for c in ("block_t", "num_warps", "unpack", "num_splits", "num_stages", "prefetch",
                                    "q_in_registers", "chunk_rows", "tile")
               if c in best}
        graph = f" (graph {dflt['graph_frac_bw']:6.1%}, {dflt['graph_ms'] * 1e3:7.1f} us)" if "graph_ms" in dflt else ""
        print(f"{' '.join(str(x) for x in key if x is not None):60s} default {dflt['frac_bw']:6.1%} "
              f"({dflt['ms'] * 1e3:7.1f} us){graph}  best {best['frac_bw']:6.1%} ({best['ms'] * 1e3:7.1f} us) {cfg} "
              f"peer {peer:6.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "copy_bandwidth_GBps": bw / 1e9, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

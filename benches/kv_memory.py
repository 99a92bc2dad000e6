"""Bytes per token per layer of engramdb's KV cache, measured from the tensors it holds, at long contexts.

``kv_quality.py`` measures memory at the end of its 640-token run, where the full-precision window
(32 to 63 tokens at R = 32) is still a large share, and the model runs in float32 on the CPU. This
script fills one ``QuantizedKVLayer`` with **fp16** random keys and values of SmolLM2-135M's shape
(3 kv heads, head size 64; 9 query heads for the mixed-precision observation queries), as they would
be on a GPU, with a prefill of ``T - 64`` tokens and 64 one-token decode steps, flushes, and sums the
bytes of every tensor the layer holds (packed codes, scale/minimum, super-scales, mixed-precision ids
and refinement codes, and the fp16 window and sinks). Random data: the byte counts do not depend on
the values. No model, no GPU needed::

    python benches/kv_memory.py [--tokens 640,4096,16384] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(os.path.dirname(HERE), "python", "engramdb"))

H_KV, H_Q, D = 3, 9, 64
FP16 = 2 * H_KV * D * 2  # keys + values in fp16: 768 B/token/layer

# name -> QuantizedKVLayer arguments (the settings of kv_quality.py)
SETTINGS = {
    "engramdb-4bit": dict(bits=4),
    "engramdb-4bit-m8": dict(bits=4, meta_bits=8),
    "engramdb-2bit": dict(bits=2),
    "engramdb-2bit-m8": dict(bits=2, meta_bits=8),
    "engramdb-2bit-sink4-m8": dict(bits=2, meta_bits=8, sink_tokens=4),
    "engramdb-2bit-sink4-mikv25": dict(bits=2, meta_bits=8, sink_tokens=4, important_ratio=0.25, extra_bits=2),
    "engramdb-2bit-sink4-mikv6": dict(bits=2, meta_bits=8, sink_tokens=4, important_ratio=0.0625, extra_bits=2),
    "engramdb-2bit-sink4-mikv50": dict(bits=2, meta_bits=8, sink_tokens=4, important_ratio=0.5, extra_bits=2),
    "engramdb-2bit-mikv25": dict(bits=2, meta_bits=8, important_ratio=0.25, extra_bits=2),
    "engramdb-2bit-sink4-mikv12e4": dict(bits=2, meta_bits=8, sink_tokens=4, important_ratio=0.125, extra_bits=4),
    # 8-bit metadata rounded to nearest + Hadamard-rotated values: the same bytes as the m8 rows above
    "engramdb-4bit-m8n-rotv": dict(bits=4, meta_bits=8, meta_round="nearest", rotate_values=True),
    "engramdb-2bit-sink4-m8n-rotv": dict(bits=2, meta_bits=8, meta_round="nearest", rotate_values=True,
                                         sink_tokens=4),
    # one of the 4 layers with 4-bit keys in kv_quality's engramdb-2bit-sink4-m8n-rotv-k4x4 (the other 26 are
    # engramdb-2bit-sink4-m8n-rotv): that setting's bytes are (26 x those + 4 x these) / 30
    "engramdb-k4v2-sink4-m8n-rotv": dict(bits=2, key_bits=4, meta_bits=8, meta_round="nearest", rotate_values=True,
                                         sink_tokens=4),
    "engramdb-2bit-sink4-mikv6-m8n-rotv": dict(bits=2, meta_bits=8, meta_round="nearest", rotate_values=True,
                                               sink_tokens=4, important_ratio=0.0625, extra_bits=2),
    "engramdb-4bit-g64": dict(bits=4, group_size=64, residual_length=64),
    "engramdb-2bit-g64": dict(bits=2, group_size=64, residual_length=64),
}


def layer_class():
    try:
        from engramdb.gpu import QuantizedKVLayer
    except Exception:  # no native module: the gpu package stands alone
        from gpu import QuantizedKVLayer
    return QuantizedKVLayer


def measure(kwargs: dict, tokens: int, seed: int = 0) -> dict:
    kw = dict(group_size=32, residual_length=32, backend="torch")
    kw.update(kwargs)
    layer = layer_class()(**kw)
    g = torch.Generator().manual_seed(seed)

    def step(n):
        k = torch.randn(1, H_KV, n, D, generator=g).half()
        v = torch.randn(1, H_KV, n, D, generator=g).half()
        layer.observe(torch.randn(1, H_Q, min(n, 32), D, generator=g).half(), None)
        layer.update(k, v)

    step(tokens - 64)
    for _ in range(64):
        step(1)
    layer.flush()
    nb = layer.nbytes()
    total = nb["quantized"] + nb["window"]
    return {"tokens": tokens, "bytes_per_token_layer": total / tokens, "x_smaller_than_fp16": FP16 * tokens / total,
            "quantized_bytes_per_token_layer": nb["quantized"] / nb["quantized_tokens"],
            "window_tokens": nb["window_tokens"], "window_dtype": str(layer.keys.dtype)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="640,4096,16384")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print(f"fp16 KV = {FP16} B/token/layer (3 kv heads x 64 x 2 tensors x 2 B)")
    for name in args.settings.split(","):
        for t in map(int, args.tokens.split(",")):
            r = {"setting": name, **measure(SETTINGS[name], t)}
            rows.append(r)
            print(f"{name:30s} T={t:6d}  {r['bytes_per_token_layer']:7.1f} B/tok/layer ({r['x_smaller_than_fp16']:.2f}x)"
                  f"  quantized part {r['quantized_bytes_per_token_layer']:6.1f}"
                  f" ({FP16 / r['quantized_bytes_per_token_layer']:.2f}x)  window {r['window_tokens']} tok fp16",
                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()

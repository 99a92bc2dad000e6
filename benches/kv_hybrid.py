"""Whole-cache bytes of a model with sliding-window and full-attention layers (Gemma 3's layout).

``QuantizedKVCache(config)`` quantizes the full-attention layers and leaves each sliding-window layer the bounded
full-precision window that transformers' ``DynamicCache`` gives it; ``quantize_sliding=True`` quantizes every
layer and keeps every token (the old layout). This script fills each cache with fp16 random keys and values of
the model's shape through ``cache.update`` (a prefill of ``T - 1`` tokens and one decode step, then a flush:
the state that any sequence of steps leaves, since a flush moves every whole group it can), and sums the bytes
each layer holds. The byte counts do not depend on the values. No model
weights and no GPU are needed::

    python benches/kv_hybrid.py [--tokens 1024,4096,32768] [--layout gemma3-1b] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(os.path.dirname(HERE), "python", "engramdb"))
sys.path.insert(0, HERE)
from kv_quality import cache_bytes  # noqa: E402  (the byte count of every cache kv_quality.py compares)

# the published shapes (config.json of each checkpoint): layers, kv heads, head size, window; every 6th layer full
LAYOUTS = {
    "gemma3-1b": dict(num_hidden_layers=26, num_key_value_heads=1, head_dim=256, sliding_window=512),
    "gemma3-4b": dict(num_hidden_layers=34, num_key_value_heads=4, head_dim=256, sliding_window=1024),
}


def gpu_package():
    try:
        import engramdb.gpu as G
    except Exception:  # no native module: the gpu package stands alone
        import gpu as G
    return G


def make_config(layout: str):
    from transformers import Gemma3TextConfig

    shape = LAYOUTS[layout]
    n = shape["num_hidden_layers"]
    return Gemma3TextConfig(vocab_size=256, hidden_size=256, intermediate_size=256, num_attention_heads=4, **shape,
                            layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)])


def fill(cache, cfg, tokens: int, seed: int = 0) -> int:
    """Feed ``tokens`` random fp16 tokens to every layer; returns the bytes the cache holds."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, cfg.num_key_value_heads, 0, cfg.head_dim)
    for chunk in (tokens - 1, 1):
        for i in range(cfg.num_hidden_layers):
            k = torch.randn(*shape[:2], chunk, shape[3], generator=g).half()
            cache.update(k, k.clone(), i)
    if hasattr(cache, "flush"):
        cache.flush()
    return cache_bytes(cache)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1024,4096,32768")
    ap.add_argument("--layout", default="gemma3-1b", choices=sorted(LAYOUTS))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    import transformers

    G = gpu_package()
    cfg = make_config(a.layout)
    rows = []
    for t in (int(x) for x in a.tokens.split(",")):
        caches = {
            "DynamicCache": transformers.DynamicCache(config=cfg),
            f"QuantizedKVCache({a.bits}-bit, quantize_sliding=True)": G.QuantizedKVCache(
                cfg, bits=a.bits, backend="torch", quantize_sliding=True),
            f"QuantizedKVCache({a.bits}-bit)": G.QuantizedKVCache(cfg, bits=a.bits, backend="torch"),
        }
        got = {name: fill(cache, cfg, t) for name, cache in caches.items()}
        fp16_all = 2 * t * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
        for name, b in got.items():
            rows.append(dict(layout=a.layout, tokens=t, cache=name, mib=b / 2**20, vs_fp16_every_token=fp16_all / b,
                             vs_dynamic=got["DynamicCache"] / b))
    print("| layout | tokens | cache | MiB held | x smaller than fp16 of every token | x smaller than DynamicCache |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['layout']} | {r['tokens']} | {r['cache']} | {r['mib']:.2f} | {r['vs_fp16_every_token']:.2f} | "
              f"{r['vs_dynamic']:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

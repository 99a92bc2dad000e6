"""Rank SmolLM2-135M's layers by how much 2-bit keys disturb their attention output, on a calibration text.

Used to choose the layers that keep 4-bit keys in kv_quality.py's ``engramdb-2bit-sink4-m8n-rotv-k4x4``
(``WIDE_KEY_LAYERS``). The calibration text defaults to the repository's README.md, not kv_quality's TEXT.

One prefill of ``--tokens`` tokens with an attention function that records each layer's queries, keys
and values (after RoPE, as the cache sees them). Per layer, keys are quantized as the cache would
(``--sinks`` first tokens exact, then 2-bit keys per channel in groups of 32 tokens, 8-bit metadata rounded
to nearest, the last 32+ tokens exact) while values stay exact, and the script reports the relative
squared error of the attention output for the queries from position ``--from`` on, each attending to the
quantized part the cache would hold at that position.

    python benches/kv_calibrate.py                      # README.md, 640 tokens
    python benches/kv_calibrate.py --text-from-kv-quality  # kv_quality's own TEXT, for comparison
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import kv_quality  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def quantize_keys_fn():
    try:
        from engramdb.gpu import dequantize, quantize_keys
    except Exception:  # no native module: the gpu package stands alone
        sys.path.append(str(ROOT / "python" / "engramdb"))
        from gpu import dequantize, quantize_keys
    return quantize_keys, dequantize


@torch.inference_mode()
def capture(model, ids):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rec = []

    def attn(module, query, key, value, attention_mask, **kw):
        rec.append((query.float().clone(), key.float().clone(), value.float().clone()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("engramdb_calibrate", attn)
    model.set_attn_implementation("engramdb_calibrate")
    model(ids, use_cache=False)
    return rec


def layer_error(q, k, v, bits, sinks, start, g=32, window=32) -> float:
    quantize_keys, dequantize = quantize_keys_fn()
    t = k.shape[2]
    n = (t - sinks - window) // g * g
    kq = dequantize(quantize_keys(k[:, :, sinks:sinks + n], bits, g, meta_bits=8, meta_round="nearest",
                                  backend="torch"), torch.float32, backend="torch")
    rep = q.shape[1] // k.shape[1]
    kk, vv, kqq = (x.repeat_interleave(rep, 1) for x in (k, v, kq))
    num = den = 0.0
    for p0 in range(start, t, g):
        nq = max(0, (p0 - sinks - window) // g * g)  # quantized tokens the cache holds for queries p0..p0+g-1
        keys = torch.cat([kk[:, :, :sinks], kqq[:, :, :nq], kk[:, :, sinks + nq:p0 + g]], 2)
        mask = torch.ones(g, p0 + g, dtype=torch.bool).tril(p0)
        qs = q[:, :, p0:p0 + g]
        o = torch.nn.functional.scaled_dot_product_attention(qs, kk[:, :, :p0 + g], vv[:, :, :p0 + g], attn_mask=mask)
        oq = torch.nn.functional.scaled_dot_product_attention(qs, keys, vv[:, :, :p0 + g], attn_mask=mask)
        num += (o - oq).pow(2).sum().item()
        den += o.pow(2).sum().item()
    return num / den


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", default=str(ROOT / "README.md"))
    ap.add_argument("--text-from-kv-quality", action="store_true")
    ap.add_argument("--tokens", type=int, default=640)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--from", dest="start", type=int, default=320)
    ap.add_argument("--top", type=int, default=4)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    tok, model = kv_quality.load_model()
    text = kv_quality.TEXT if args.text_from_kv_quality else open(args.text).read()
    ids = tok(text, return_tensors="pt").input_ids[:, :args.tokens]
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"the text has only {ids.shape[1]} tokens")
    rec = capture(model, ids)
    errs = [layer_error(q, k, v, args.bits, args.sinks, args.start) for q, k, v in rec]
    order = sorted(range(len(errs)), key=lambda i: -errs[i])
    print(f"{'TEXT of kv_quality.py' if args.text_from_kv_quality else args.text}: {ids.shape[1]} tokens; "
          f"{args.bits}-bit keys, relative attention-output error per layer (mean {sum(errs) / len(errs):.4f})")
    print("  ".join(f"{i}:{errs[i]:.3f}" for i in order))
    print(f"top {args.top}: {tuple(order[:args.top])}")
    return order, errs


if __name__ == "__main__":
    main()

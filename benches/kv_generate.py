"""Decode speed of a whole model with each KV cache: what ``QuantizedKVCache`` costs or saves in generation.

The kernel benchmark (``gpu_bench.py``) times decode attention alone. A model's decode step also runs its
projections and MLPs, and at small batches the host's Python around every layer's kernels; this times the
whole step, one token at a time with greedy choice, for:

* ``fp16 DynamicCache``: transformers' default cache, SDPA attention (the peer);
* ``4-bit dequantize``: ``QuantizedKVCache(bits=4)``, SDPA over the dequantized cache each step;
* ``4-bit fused`` / ``2-bit fused``: ``fused_attention=True`` with the registered attention, whose decode
  kernels read the packed cache.

The model has random weights (speed does not depend on them; nothing to download) in one of two shapes:
``smollm2`` (SmolLM2-135M: 30 layers, 9/3 heads of 64 channels, the model of ``kv_quality.py``) and
``llama8b-4l`` (Llama-3-8B's layer: 32/8 heads of 128 channels, hidden 4096, MLP 14336; 4 of its 32 layers,
so that it loads in seconds). For each context length and batch: a prefill of the context, then ``--steps``
timed decode steps after two untimed ones; ms a step (the GPU synchronised before and after the timed loop),
the host's time to issue one (the median of 8 more steps, each issued onto an idle GPU; near the step's time,
the step is host-bound), tokens a second (batch / step time), the GPU memory above the weights that the
cache holds after the steps and at the steps' peak, and each cache's time as a ratio of the DynamicCache's
in the same process on the same model and prompt.

    python benches/kv_generate.py [--model smollm2|llama8b-4l] [--contexts 1024,8192,32768] [--batches 1,8]
                                  [--steps 32] [--json OUT]

Without CUDA it says so and stops, unless ``--cpu-smoke``: a tiny model and context on the CPU (the fused
rows through Triton's interpreter), to check that the script runs; its times mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

SHAPES = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64),
    "llama8b-4l": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    # --cpu-smoke only
    "tiny": dict(vocab_size=101, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32),
}
CACHES = ("fp16 DynamicCache", "4-bit dequantize", "4-bit fused", "2-bit fused")


def load_gpu_package():
    try:
        import engramdb.gpu as G
    except Exception:  # no native module: the gpu package stands alone
        sys.path.append(os.path.join(os.path.dirname(HERE), "python", "engramdb"))
        import gpu as G
    return G


def make_model(shape: str, attn: str, device: str, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=1 << 17, rope_theta=500000.0)
    cfg._attn_implementation = attn
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def make_cache(G, name: str, model):
    import transformers

    if name == "fp16 DynamicCache":
        return transformers.DynamicCache(config=model.config)
    bits, fused = (2 if name.startswith("2-bit") else 4), name.endswith("fused")
    # ("auto" is Triton on CUDA; the fused rows of --cpu-smoke ask for it, i.e. the interpreter)
    return G.QuantizedKVCache(model.config, bits=bits, fused_attention=fused, backend="triton" if fused else "auto")


def decode_rate(G, model, cache_name: str, prompt, steps: int, launches: list) -> dict:
    """Prefill ``prompt`` into a fresh cache, then ``steps`` timed greedy decode steps (two untimed first)."""
    import torch

    cuda = prompt.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cache = make_cache(G, cache_name, model)
    kw = G.cache_kwargs(model, cache)
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()  # (the weights and the prompt)
    with torch.no_grad():
        # (logits of the last position only: at B 8 x 32K all of SmolLM2's would take 26 GB)
        tok = model(prompt, use_cache=True, logits_to_keep=1, **kw).logits[:, -1:].argmax(-1)
        for _ in range(2):
            tok = model(tok, use_cache=True, **kw).logits[:, -1:].argmax(-1)
        launched = len(launches)
        sync()
        if cuda:  # (the prefill's activations are not the decode's concern)
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = model(tok, use_cache=True, **kw).logits[:, -1:].argmax(-1)
        sync()
        dt = (time.perf_counter() - t0) / steps
        fused = (len(launches) - launched) / steps
        # the host's own time a step: each of a few more steps issued onto an idle GPU (with a queue of pending
        # launches, issuing would also wait for room in it)
        issue = []
        for _ in range(max(1, min(8, steps))):
            t1 = time.perf_counter()
            tok = model(tok, use_cache=True, **kw).logits[:, -1:].argmax(-1)
            issue.append(time.perf_counter() - t1)
            sync()
    b = prompt.shape[0]
    gib = 2.0 ** -30
    return dict(cache=cache_name, ms_per_step=dt * 1e3, tokens_per_s=b / dt, seq_len=cache.get_seq_length(),
                # (the forward returns once its kernels are queued: nothing in a step waits on the GPU)
                host_ms_per_step=sorted(issue)[len(issue) // 2] * 1e3,
                fused_launches_per_step=fused,
                # GPU memory above the weights: held by the cache after the steps, and at the steps' peak
                held_gib=(torch.cuda.memory_allocated() - base) * gib if cuda else None,
                decode_peak_gib=(torch.cuda.max_memory_allocated() - base) * gib if cuda else None)


@contextlib.contextmanager
def fused_calls(G):
    """A list that gets a grid for every launch of the decode merge kernel (once in every fused decode call)
    inside the block; the kernel is put back after it."""
    da = sys.modules[G.__name__ + ".decode_attention"]
    launched, real = [], da._merge_splits_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

    da._merge_splits_kernel = Spy()
    try:
        yield launched
    finally:
        da._merge_splits_kernel = real


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("smollm2", "llama8b-4l"), default="smollm2")
    ap.add_argument("--contexts", default="1024,8192,32768", help="prompt lengths, comma-separated")
    ap.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps a row")
    ap.add_argument("--caches", default=",".join(CACHES), help="a comma-separated subset of: " + ", ".join(CACHES))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model and context on the CPU (times mean nothing)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    caches = [c.strip() for c in args.caches.split(",")]
    unknown = [c for c in caches if c not in CACHES]
    if unknown:
        ap.error(f"unknown cache(s) {unknown}; choose from {list(CACHES)}")

    import torch

    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # (before the gpu package imports triton)
        device, dtype, shape = "cpu", torch.float32, "tiny"
        contexts, batches, steps = [80], [1, 2], min(args.steps, 3)
    elif not torch.cuda.is_available():
        print("kv_generate.py: no CUDA device here; nothing timed (run it on a GPU, or --cpu-smoke to check it runs)")
        return 0
    else:
        device, dtype, shape = "cuda", torch.float16, args.model
        contexts = [int(x) for x in args.contexts.split(",")]
        batches = [int(x) for x in args.batches.split(",")]
        steps = args.steps

    G = load_gpu_package()
    with fused_calls(G) as launches:
        rows = run_rows(G, shape, device, dtype, contexts, batches, steps, caches, launches)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, device=device, rows=rows), f, indent=1)
    return 0


def run_rows(G, shape, device, dtype, contexts, batches, steps, caches, launches) -> list:
    import torch

    fused_name = G.register_attention()
    models = {}
    rows = []
    print(f"model {shape} (random weights), {dtype}, on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    print("| context | batch | cache | ms a step | host ms to issue one | tokens/s | x DynamicCache's time | GiB held "
          "| GiB at the steps' peak | fused calls a step |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for ctx in contexts:
        for b in batches:
            prompt = torch.randint(0, SHAPES[shape]["vocab_size"], (b, ctx), generator=torch.Generator().manual_seed(ctx + b))
            prompt = prompt.to(device)
            base = None
            for name in caches:
                attn = fused_name if name.endswith("fused") else "sdpa"
                if attn not in models:
                    models[attn] = make_model(shape, attn, device, dtype)
                try:
                    r = decode_rate(G, models[attn], name, prompt, steps, launches)
                except torch.cuda.OutOfMemoryError:
                    r = dict(cache=name, error="out of memory")
                    torch.cuda.empty_cache()
                r.update(context=ctx, batch=b, model=shape)
                rows.append(r)
                if "error" in r:
                    print(f"| {ctx} | {b} | {name} | out of memory | | | | | | |")
                    continue
                if name == "fp16 DynamicCache":
                    base = r["ms_per_step"]
                r["time_vs_dynamic"] = r["ms_per_step"] / base if base else None
                ratio = f"{r['time_vs_dynamic']:.2f}" if base else "-"
                mem = " | ".join(f"{r[m]:.2f}" if r[m] is not None else "-" for m in ("held_gib", "decode_peak_gib"))
                print(f"| {ctx} | {b} | {name} | {r['ms_per_step']:.2f} | {r['host_ms_per_step']:.2f} | "
                      f"{r['tokens_per_s']:,.0f} | {ratio} | {mem} | "
                      f"{r['fused_launches_per_step']:g} |", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())

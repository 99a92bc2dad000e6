"""What a decode-attention call costs the host before its kernels run (no GPU needed).

At small batches a decode step is host-bound: on the H200 a B 1 x 32K-token call took 87 us against 38 us of
kernel time (benches/RESULTS.md). This times the Python that ``kivi_decode_attention`` runs around its
launches, on CPU tensors with the launches caught (they do nothing), and the pieces of it:

* ``wave_splits``, the split count a GPU call picks, against its first form (every split count tried, with
  ``triton.cdiv``), in the same process on the same arguments;
* the input checks (``_check_decode_inputs``; a ``QuantizedTensor`` is checked when it is made, not here);
* the whole host path of a call (checks, the key offsets' and the merge's launch arguments, the decode
  kernel's), with the interpreter's split rule; a GPU call adds the split choice above and a dictionary
  lookup, and Triton's launcher, which this cannot time;
* a whole decode step of one cache layer: ``QuantizedKVLayer.update`` and the registered attention function.

    python benches/gpu_host.py [--json FILE]

Best of 5 repeats of a loop; the figures depend on the host's CPU, so compare rows of one run only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton path on CPU tensors (its launches are caught)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(os.path.dirname(HERE), "python", "engramdb"))

import torch  # noqa: E402
import triton  # noqa: E402

try:
    import engramdb.gpu as G
except Exception:  # no native module: the gpu package stands alone
    import gpu as G

DA = sys.modules[G.__name__ + ".decode_attention"]
KQ = sys.modules[G.__name__ + ".kv_quant"]
LAUNCHED = ("_kivi_decode_warps_kernel", "_kivi_decode_mma_kernel", "_kivi_decode_kernel", "_key_offsets_kernel",
            "_merge_splits_kernel")


def wave_splits_every_count(heads, tokens, slots, most, block_t=64, overhead=128):
    """``wave_splits`` as it first ran: the modelled cost of every split count."""
    def cost(s):
        chunk = triton.cdiv(triton.cdiv(tokens, s), block_t) * block_t
        return triton.cdiv(heads * s, slots) * (chunk + overhead), s
    return min(range(1, max(1, most) + 1), key=cost)


def best_us(fn, n: int, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


class _Counted:
    """A kernel stand-in: counts launches, runs nothing."""

    launches = 0

    def __init__(self, name: str):
        self.__name__ = name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _Counted.launches += 1
        return launch


@contextlib.contextmanager
def launches_caught():
    """The decode module's kernels replaced by :class:`_Counted` and the subnormal probe's answer set to
    yes (as on the H100 and H200: the folded keys' path) for the block; both put back after it."""
    saved = {name: getattr(DA, name) for name in LAUNCHED}
    probed = DA._SUBNORMAL_DOT.get(("cpu", None))
    DA._SUBNORMAL_DOT[("cpu", None)] = True
    try:
        for name in LAUNCHED:
            setattr(DA, name, _Counted(name))
        _Counted.launches = 0
        yield
    finally:
        for name, fn in saved.items():
            setattr(DA, name, fn)
        DA._SUBNORMAL_DOT.pop(("cpu", None))
        if probed is not None:
            DA._SUBNORMAL_DOT[("cpu", None)] = probed


def decode_host_path(order: str, b: int, hkv: int, n_rep: int, t: int, d: int = 128) -> dict:
    torch.manual_seed(0)
    k = torch.randn(b, hkv, t, d, dtype=torch.float16)
    kq = KQ.quantize_keys(k[:, :, : t - 64], 4, 32, backend="torch")
    vq = KQ.quantize_values(k[:, :, : t - 64], 4, 32, backend="torch")
    if order != "kivi":
        kq, vq = KQ.to_mma_order(kq), KQ.to_mma_order(vq, warps=order == "mma_w")
    kr = k[:, :, t - 64:].contiguous()
    q = torch.randn(b, hkv * n_rep, d, dtype=torch.float16)
    with launches_caught():
        DA.kivi_decode_attention(q, kq, vq, kr, kr, backend="triton")
        launches = _Counted.launches
        call = best_us(lambda: DA.kivi_decode_attention(q, kq, vq, kr, kr, backend="triton"), 500)
        checks = best_us(lambda: DA._check_decode_inputs(q, kq, vq, kr, kr), 2000)
    return dict(order=order, shape=f"B{b} x {hkv * n_rep}/{hkv} heads x {t} tokens, head {d}", kernel=DA.LAST_LAUNCH.get("kernel"),
                launches=launches, call_us=call, checks_us=checks)


def cache_step_host(b: int = 1, hkv: int = 8, n_rep: int = 4, prefill: int = 256, d: int = 128) -> dict:
    """A decode step through ``QuantizedKVLayer.update`` and the registered attention function (fused path),
    host side, launches caught: the median over the 30 steps between two flushes (a flush quantizes, and
    here its kernels would be interpreted), 5 rounds from the same state."""
    from importlib import import_module
    from statistics import median

    KC = import_module(G.__name__ + ".kv_cache")  # (needs transformers)
    torch.manual_seed(0)
    layer = KC.QuantizedKVLayer(bits=4, group_size=32, residual_length=32, fused_attention=True, backend="triton")
    k = torch.randn(b, hkv, prefill, d, dtype=torch.float16)
    layer.update(k, k.clone())
    new = torch.randn(b, hkv, 1, d, dtype=torch.float16)
    layer.update(new, new)  # the prefill's flush (its quantize kernels run in the interpreter, once)
    state = (layer.keys, layer.values, layer.cumulative_length)
    q = torch.randn(b, hkv * n_rep, 1, d, dtype=torch.float16)
    times, updates = [], []
    with launches_caught():
        for _ in range(5):
            layer.keys, layer.values, layer.cumulative_length = state
            for _ in range(30):  # window 34 .. 63 tokens: no flush
                t0 = time.perf_counter()
                kk, vv = layer.update(new, new)
                t1 = time.perf_counter()
                KC.kivi_attention_forward(None, q, kk, vv, None, scaling=d ** -0.5)
                times.append(time.perf_counter() - t0)
                updates.append(t1 - t0)
        assert layer.qkeys.shape[2] == prefill - 32, "a flush ran inside the timed steps"
    return dict(shape=f"B{b} x {hkv * n_rep}/{hkv} heads, head {d}, 4-bit, {layer.qkeys.order}/{layer.qvalues.order}",
                step_us=median(times) * 1e6, update_us=median(updates) * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    rows = []
    print("| wave_splits(heads, tokens, slots, most) | splits | every count tried | now | ratio |")
    print("| --- | ---: | ---: | ---: | ---: |")
    # (B x kv heads, tokens, programs an SM x 132 SMs, tokens / 256): the bench's decode shapes
    for a in [(256, 16384, 396, 64), (256, 16384, 264, 64), (8, 32768, 264, 128), (64, 8192, 264, 32),
              (36, 16384, 528, 64), (8, 131072, 264, 512)]:
        assert wave_splits_every_count(*a) == DA.wave_splits(*a)
        old = best_us(lambda a=a: wave_splits_every_count(*a), 10)
        new = best_us(lambda a=a: DA.wave_splits(*a), 1000)
        rows.append(dict(what="wave_splits", args=a, splits=DA.wave_splits(*a), before_us=old, now_us=new))
        print(f"| {a} | {DA.wave_splits(*a)} | {old:,.1f} us | {new:.2f} us | {old / new:,.0f}x |")
    print()
    print("| decode call, host side (launches caught) | kernel | launches | whole call | of it: input checks |")
    print("| --- | --- | ---: | ---: | ---: |")
    for order, shape in [("mma_w", (1, 8, 4, 4096)), ("mma", (1, 8, 4, 4096)), ("kivi", (1, 8, 4, 4096)),
                         ("mma_w", (8, 8, 4, 1024))]:
        r = decode_host_path(order, *shape)
        rows.append(dict(what="decode_host", **r))
        print(f"| {r['shape']}, {order} order | {r['kernel']} | {r['launches']} | {r['call_us']:.1f} us | "
              f"{r['checks_us']:.1f} us |")
    r = cache_step_host()
    rows.append(dict(what="cache_step", **r))
    print(f"\n| a decode step of one layer: QuantizedKVLayer.update + the attention function, launches caught |\n"
          f"| --- |\n| {r['shape']}: {r['step_us']:.1f} us, of it the update {r['update_us']:.1f} us "
          "(medians of 150 steps; on CPU tensors the window's appends are the copies themselves) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, triton=triton.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

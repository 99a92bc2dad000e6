"""Offline look at a decode-attention kernel's machine code (no GPU needed): compile it for sm_90 exactly as
the JIT would for a real call, and count the main loop's instructions and the registers.

    python benches/gpu_sass.py [--order mma_w|mma|kivi] [--bits 4] [--d 128] [--key-meta registers|shared]
                               [--meta ahead|tile] [--swap-pv on|off] [--swap-qk on|off] [--movmatrix on|off]
                               [--unroll2 on|off] [--fold-keys on|off] [--stages N]
                               [--maxnreg N] [--listing FILE]

The host code of ``kivi_decode_attention`` runs on CPU tensors up to the launch; the launch is caught and
its arguments give the signature (pointer dtypes, integers divisible by 16 and integers equal to 1 as the
JIT specializes them) and the compile-time constants. Use the device's Triton (3.6.0 on the lent H100 and
H200): the same source compiles to different code under other versions (gpu/NOTES.md). ``--listing``
writes the whole ``nvdisasm`` listing, for reading the loop.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(os.path.dirname(HERE), "python", "engramdb"))
os.environ.pop("TRITON_INTERPRET", None)  # the JIT's kernels, not the interpreter's

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

try:
    import engramdb.gpu as G
except Exception:  # no native module: the gpu package stands alone
    import gpu as G

DA = sys.modules[G.__name__ + ".decode_attention"]
KERNELS = ("_kivi_decode_warps_kernel", "_kivi_decode_mma_kernel", "_kivi_decode_kernel")


class _Caught(Exception):
    pass


def capture_launch(order: str, bits: int, d: int, meta_bits: int = 16, **kw):
    """(kernel, positional args, keyword args) of the launch a B1 x 4 query heads x 1 kv head x 4K-token call
    would make."""
    caught = {}
    saved = {name: getattr(DA, name) for name in KERNELS}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                caught.update(kernel=saved[self.name], args=args, kwargs=kwargs)
                raise _Caught
            return launch

    class Skipped:  # the small kernels the host runs before the decode kernel (the folded keys' offsets)
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    saved["_key_offsets_kernel"] = DA._key_offsets_kernel
    DA._key_offsets_kernel = Skipped()
    for name in KERNELS:
        setattr(DA, name, Recorder(name))
    try:
        t, hkv, n_rep = 4096, 1, 4
        q = torch.randn(1, hkv * n_rep, d, dtype=torch.float16)
        k = torch.randn(1, hkv, t, d, dtype=torch.float16)
        kq = G.kv_quant.quantize_keys(k[:, :, : t - 64], bits, 32, meta_bits=meta_bits)
        vq = G.kv_quant.quantize_values(k[:, :, : t - 64], bits, 32, meta_bits=meta_bits)
        if order != "kivi":
            kq = G.kv_quant.to_mma_order(kq)
            vq = G.kv_quant.to_mma_order(vq, warps=order == "mma_w")
        kr = k[:, :, t - 64:].contiguous()
        opts = dict(num_splits=None, block_t=64, num_warps=4, unpack="join", num_stages=None, q_regs=None,
                    prefetch="all")
        opts.update(kw)
        try:  # the host side of kivi_decode_attention's Triton path, whatever the device
            DA._decode_triton(q, kq, vq, kr, kr, d ** -0.5, *opts.values())
        except _Caught:
            pass
    finally:
        for name, fn in saved.items():
            setattr(DA, name, fn)
    return caught["kernel"], caught["args"], caught["kwargs"]


def signature(fn, args, kwargs):
    """The signature, constants and attributes the JIT would compile ``fn`` with for these arguments."""
    names = fn.arg_names
    sig, constexprs, attrs = {}, {}, {}
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    for i, name in enumerate(names):
        v = values[name]
        if fn.params[i].is_constexpr:
            sig[name] = "constexpr"
            constexprs[(i,)] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + {torch.float16: "fp16", torch.float32: "fp32", torch.bfloat16: "bf16",
                               torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8"}[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # the caching allocator's pointers are 16-byte aligned
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[name] = "constexpr"
                constexprs[(i,)] = 1
            else:
                sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32"
    opts = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages", "maxnreg")}
    return sig, constexprs, attrs, opts


def listing_loops(sass: str) -> tuple[list, list]:
    """An nvdisasm listing's instructions, and its loops as ``(first, last)`` instruction indices (one per
    backward branch), in the order of their branches."""
    ins, labels = [], {}
    for line in sass.splitlines():
        m = re.match(r"^\s*\.(L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(.*?);", line)
        if m:
            ins.append(m.group(1))
    loops = [(labels[m.group(1)], i) for i, t in enumerate(ins)
             if (m := re.search(r"BRA\s+(?:`\()?\.?(L_x_\d+)", t)) and labels.get(m.group(1), len(ins)) <= i]
    return ins, loops


def loop_ops(sass: str) -> Counter:
    """Opcode counts of the first backward-branch loop in an nvdisasm listing: the quantized cache's tile loop
    (the full-precision residual's loop comes after it, and can be the longer one)."""
    ins, loops = listing_loops(sass)
    a, b = min(loops)
    return Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in ins[a:b + 1])


def disassemble(cubin: bytes) -> tuple[str, str]:
    """The ``nvdisasm`` listing and the ``cuobjdump`` resource usage (registers, stack, shared memory) of a
    cubin, with the tools Triton ships."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([os.path.join(bindir, "nvdisasm"), "-c", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    return sass, usage


def compile_kernel(fn, args, kwargs):
    sig, constexprs, attrs, opts = signature(fn, args, kwargs)
    k = triton.compile(ASTSource(fn, sig, constexprs=constexprs, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                       options=opts)
    sass, usage = disassemble(k.asm["cubin"])
    return sass, usage, k.asm.get("ptx", "")


def asm_pair_words(ptx: str) -> tuple[int, int]:
    """(pair dequantizations, those whose two elements got one word) in the PTX of a ``--check-pairs``
    compile, where the asm reads its second word ($2) into ``t`` just before the first ($1)."""
    pairs = re.findall(r"mov\.b32 t, (%r\d+); lop3\.b32 t, (%r\d+),", ptx)
    return len(pairs), sum(a == b for a, b in pairs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--order", default="mma_w", choices=("mma_w", "mma", "kivi"))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--meta-bits", type=int, default=16, choices=(16, 8))
    ap.add_argument("--key-meta", choices=("registers", "shared"),
                    help="the warps kernel's key scales (WARPS_KEY_META_IN_REGISTERS; default: the module's)")
    ap.add_argument("--q-in-registers", default=None, choices=("on", "off"))
    ap.add_argument("--block-t", type=int, default=None)
    ap.add_argument("--maxnreg", type=int, help="the warps kernel's register cap (decode_attention.WARPS_MAXNREG)")
    ap.add_argument("--meta", choices=("ahead", "tile"),
                    help="the warps kernel's scales fetched a tile ahead or at their tile (WARPS_META_AHEAD)")
    ap.add_argument("--swap-pv", choices=("on", "off"), help="the warps kernel's P V as (V^T P^T)^T (WARPS_SWAP_PV)")
    ap.add_argument("--swap-qk", choices=("on", "off"), help="the warps kernel's scores as K Q^T (WARPS_SWAP_QK)")
    ap.add_argument("--movmatrix", choices=("on", "off"),
                    help="with --swap-qk on: P^T transposed by movmatrix (WARPS_MOVMATRIX)")
    ap.add_argument("--unroll2", choices=("on", "off"), help="the warps kernel's loop unrolled by two (WARPS_UNROLL2)")
    ap.add_argument("--fold-keys", choices=("on", "off"),
                    help="the warps kernel's keys as subnormal codes, scales folded into Q^T (WARPS_FOLD_KEYS)")
    ap.add_argument("--stages", type=int, help="the warps kernel's Triton pipeline depth (WARPS_NUM_STAGES)")
    ap.add_argument("--check-pairs", action="store_true",
                    help="check that every inline-asm pair dequantization of the warps kernel gets one word for "
                         "both of its elements (exit 1 otherwise)")
    ap.add_argument("--listing", help="write the nvdisasm listing here")
    ap.add_argument("--ptx", help="write the PTX here")
    args = ap.parse_args(argv)
    if args.key_meta:
        DA.WARPS_KEY_META_IN_REGISTERS = args.key_meta == "registers"
    if args.meta:
        DA.WARPS_META_AHEAD = args.meta == "ahead"
    if args.maxnreg:
        DA.WARPS_MAXNREG = args.maxnreg
    if args.swap_pv:
        DA.WARPS_SWAP_PV = args.swap_pv == "on"
    if args.swap_qk:
        DA.WARPS_SWAP_QK = args.swap_qk == "on"
    if args.movmatrix:
        DA.WARPS_MOVMATRIX = args.movmatrix == "on"
    if args.unroll2:
        DA.WARPS_UNROLL2 = args.unroll2 == "on"
    if args.fold_keys:
        DA.WARPS_FOLD_KEYS = args.fold_keys == "on"
    if args.stages:
        DA.WARPS_NUM_STAGES = args.stages
    kw = {}
    if args.q_in_registers:
        kw["q_regs"] = args.q_in_registers == "on"
    if args.block_t:
        kw["block_t"] = args.block_t
    if args.check_pairs:  # the same asm, reading $2 too, so that the PTX names the register Triton binds to it
        for name in ("_PAIR_ASM", "_CODES_ASM"):
            probe = getattr(DA, name).value.replace("lop3.b32 t, $1", "mov.b32 t, $2; lop3.b32 t, $1")
            setattr(DA, name, triton.language.constexpr(probe))
        # the folded keys' AND: the same pattern ahead of it, its result unused
        DA._SUBNORMALS_ASM = triton.language.constexpr(
            "{ .reg .b32 t; mov.b32 t, $2; lop3.b32 t, $1, t, t, 0x80; } " + DA._SUBNORMALS_ASM.value)
    # (the launch is caught on CPU tensors, where the probe of WARPS_FOLD_KEYS cannot run: compile as for a GPU
    # whose fp16 dot keeps subnormals)
    DA._SUBNORMAL_DOT[("cpu", None)] = True
    fn, a, k = capture_launch(args.order, args.bits, args.d, args.meta_bits, **kw)
    sass, usage, ptx = compile_kernel(fn, a, k)
    if args.listing:
        with open(args.listing, "w") as f:
            f.write(sass)
    if args.ptx:
        with open(args.ptx, "w") as f:
            f.write(ptx)
    if args.check_pairs:
        n, same = asm_pair_words(ptx)
        print(f"asm pairs: {n}, one word for both elements: {same}, two words: {n - same}")
        if not n or same != n:
            return 1
    ops = loop_ops(sass)
    regs = " ".join(re.findall(r"(?:REG|STACK|SHARED):\d+", usage))
    print(f"{fn.__name__} (triton {triton.__version__}, sm_90) order {args.order} {args.bits}-bit D{args.d}: "
          f"{sum(ops.values())} loop instructions; {regs}")
    print("  " + ", ".join(f"{o} {c}" for o, c in ops.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

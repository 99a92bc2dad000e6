"""Offline probe (no GPU needed): how many barriers and shared-memory operations a decode-attention tile
costs when each warp owns its own token slice, written as a batched (3D) ``tl.dot`` with the warps on the
batch axis, against the shipped mma-order kernel, where the 4 warps split every tile's columns.

It compiles for sm_90 with the installed Triton (use the device's version, 3.6.0) and counts the main
loop's instructions in the ``nvdisasm`` listing of the cubin:

    python benches/gpu_probe_batched_decode.py

The first two read fp16 K and V: they show what the softmax and the p -> V hand-over cost in each
arrangement. The third builds K^T and V from 4-bit words in registers, as the mma-order kernel does,
and shows that the batched arrangement needs no layout conversion for them either (scales left out).
See gpu/NOTES.md for the reading.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(os.path.join(os.path.dirname(HERE), "python", "engramdb"))
try:
    from engramdb.gpu.decode_attention import _codes8
except Exception:  # no native module: the gpu package stands alone
    from gpu.decode_attention import _codes8
from gpu_sass import disassemble, loop_ops  # noqa: E402  (benches/, beside this script)


@triton.jit
def _warp_softmax_step(s, m_i, l_i):
    """Each warp's online-softmax update for its scores ``s`` (4, 16, 16): new maximum, rescale, p, sum."""
    m_new = tl.maximum(m_i, tl.max(s, axis=2))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, :, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, axis=2)


@triton.jit
def _merge_warps(m_i, l_i, acc):
    """The 4 warps' states merged into the normalized output (16, 128)."""
    m = tl.max(m_i, axis=0)
    sc = tl.exp2(m_i - m[None, :])
    return tl.sum(acc * sc[:, :, None], axis=0) / tl.sum(l_i * sc, axis=0)[:, None]


@triton.jit
def _batched_warps(Q, K, V, Out, T):
    """Warp w takes tokens 16 w .. 16 w + 15 of every 64-token tile: its own running max, sum and output,
    merged across warps once at the end."""
    h = tl.arange(0, 16)
    d = tl.arange(0, 128)
    t = tl.arange(0, 16)
    w = tl.arange(0, 4)
    q = tl.load(Q + h[:, None] * 128 + d[None, :]).to(tl.float16)
    qb = tl.broadcast_to(q[None, :, :], (4, 16, 128))
    m_i = tl.full((4, 16), float("-inf"), tl.float32)
    l_i = tl.zeros((4, 16), tl.float32)
    acc = tl.zeros((4, 16, 128), tl.float32)
    for s0 in range(0, T, 64):
        kt = tl.load(K + (s0 + 16 * w[:, None, None] + t[None, None, :]) * 128 + d[None, :, None])
        s = tl.dot(qb, kt)
        m_new, alpha, p, l_i = _warp_softmax_step(s, m_i, l_i)
        v = tl.load(V + (s0 + 16 * w[:, None, None] + t[None, :, None]) * 128 + d[None, None, :])
        acc = acc * alpha[:, :, None] + tl.dot(p.to(tl.float16), v)
        m_i = m_new
    tl.store(Out + h[:, None] * 128 + d[None, :], _merge_warps(m_i, l_i, acc))


@triton.jit
def _batched_warps_packed(Q, KW, VW, Out, T):
    """The batched arrangement on 4-bit codes, each operand built in registers from the int32 words its
    thread loads (scales left out). Keys: today's mma packing (``kv_quant.to_mma_order``), warp w's columns
    ``nl + 8 r`` being tokens ``16 w + 8 r + nl``. Values: word j of thread (w, nl, kl) holds code
    ``i0 + 2 i1 + 4 i2`` of token ``16 w + 4 kl + 2 i1 + i0`` and column ``16 j + 8 i2 + nl``; mapping column
    ``16 j + 8 i2 + nl`` to channel ``16 nl + 2 j + i2`` keeps a thread's 16 channels in one group of 32."""
    th = tl.arange(0, 128)
    h = tl.arange(0, 16)
    d = tl.arange(0, 128)
    q = tl.load(Q + h[:, None] * 128 + d[None, :])
    qb = tl.broadcast_to(q[None, :, :], (4, 16, 128))
    m_i = tl.full((4, 16), float("-inf"), tl.float32)
    l_i = tl.zeros((4, 16), tl.float32)
    acc = tl.zeros((4, 16, 128), tl.float32)
    ka = tl.arange(0, 4)
    kr = tl.arange(0, 2)
    vj = tl.arange(0, 8)
    for s0 in range(0, T, 64):
        kw = tl.load(KW + s0 * 256 + th[:, None, None] * 8 + ka[None, :, None] * 2 + kr[None, None, :])
        c = _codes8(tl.reshape(kw, (4, 8, 4, 4, 2)))  # (w, nl, kl, a, r, i0, i1, i2)
        kt = tl.reshape(tl.permute(c, (0, 3, 7, 2, 6, 5, 4, 1)), (4, 128, 16)) - 1024.0  # (w, a, i2, kl, i1, i0, r, nl)
        s = tl.dot(qb, kt)
        m_new, alpha, p, l_i = _warp_softmax_step(s, m_i, l_i)
        vw = tl.load(VW + s0 * 256 + th[:, None] * 8 + vj[None, :])
        cv = _codes8(tl.reshape(vw, (4, 8, 4, 8)))  # (w, nl, kl, j, i0, i1, i2)
        v = tl.reshape(tl.permute(cv, (0, 2, 5, 4, 3, 6, 1)), (4, 16, 128)) - 1024.0  # (w, kl, i1, i0, j, i2, nl)
        acc = acc * alpha[:, :, None] + tl.dot(p.to(tl.float16), v)
        m_i = m_new
    tl.store(Out + h[:, None] * 128 + d[None, :], _merge_warps(m_i, l_i, acc))


@triton.jit
def _split_columns(Q, K, V, Out, T):
    """The same attention with the 4 warps splitting every tile's 64 columns (a 2D dot): what the shipped
    kernels do."""
    h = tl.arange(0, 16)
    d = tl.arange(0, 128)
    t = tl.arange(0, 64)
    q = tl.load(Q + h[:, None] * 128 + d[None, :]).to(tl.float16)
    m_i = tl.full((16,), float("-inf"), tl.float32)
    l_i = tl.zeros((16,), tl.float32)
    acc = tl.zeros((16, 128), tl.float32)
    for s0 in range(0, T, 64):
        kt = tl.load(K + (s0 + t[None, :]) * 128 + d[:, None])
        s = tl.dot(q, kt)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + (s0 + t[:, None]) * 128 + d[None, :])
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
        m_i = m_new
    tl.store(Out + h[:, None] * 128 + d[None, :], acc / l_i[:, None])


def compile_counts(fn) -> tuple[Counter, str]:
    sig = {"Q": "*fp16", "K": "*fp16", "V": "*fp16", "Out": "*fp32", "T": "i32"}
    if fn is _batched_warps_packed:
        sig = {"Q": "*fp16", "KW": "*i32", "VW": "*i32", "Out": "*fp32", "T": "i32"}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}
    k = triton.compile(ASTSource(fn, sig, attrs=attrs), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    sass, usage = disassemble(k.asm["cubin"])
    return loop_ops(sass), " ".join(re.findall(r"REG:\d+", usage))


def main() -> int:
    print(f"triton {triton.__version__}, sm_90, 4 warps, 64-token tiles, head size 128, fp16 K and V")
    for name, fn in (("warps split the columns (shipped)", _split_columns), ("batched: a warp per token slice", _batched_warps),
                     ("batched, 4-bit words in fragment order", _batched_warps_packed)):
        ops, regs = compile_counts(fn)
        shared = {o: c for o, c in ops.items() if re.match(r"(LDS|STS|BAR|SHFL)", o)}
        print(f"{name:36s} {sum(ops.values()):4d} loop instructions, {regs}; shared, barriers, shuffles: {shared}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

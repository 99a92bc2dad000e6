"""Fused decode attention over a KIVI cache: packed quantized tokens plus a full-precision window.

One query token per sequence attends to ``Tq`` quantized tokens (keys packed per channel, values per
token, see :mod:`kv_quant`) followed by ``Tr`` full-precision recent tokens. The Triton kernel unpacks
and dequantizes each key and value tile in registers right before its dot product, so the
full-precision cache is never written out. Work is split along the sequence (flash-decoding): each
program handles one kv head (all query heads of its GQA group at once, so each packed word is read
once) and one slice of tokens, keeps an online softmax, and writes a partial result; a second small
kernel merges the slices.

Three kernels, by how the cache's codes are packed (:func:`kv_quant.to_mma_order`):
- KIVI order (``_kivi_decode_kernel``): any bit width and head size; each dequantized tile goes through
  shared memory on its way to the tensor cores.
- mma order (``_kivi_decode_mma_kernel``): each thread loads the words of its own dot-operand fragments
  and dequantizes them there, 2 or 4 bits.
- keys in mma order, values in mma_w order (``_kivi_decode_warps_kernel``, 4 bits, head size 64 or 128):
  each warp takes its own 16 tokens of a 64-token tile, the warps merge once at the end. Its knobs are
  the ``WARPS_*`` variables below.

Timings on an H100 and an H200, and the fraction of the copy bandwidth each reaches: benches/RESULTS.md;
what was predicted and measured for each kernel version: gpu/NOTES.md.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from ._triton import HAS_TRITON, INTERPRET_AT_IMPORT, cdiv, next_pow2, pick_backend, tl, triton
from .kv_quant import QuantizedTensor, dequantize, from_mma_order

__all__ = ["kivi_decode_attention", "kivi_decode_attention_ref"]

UNPACK_MODES = {"gather": 0, "expand": 1, "join": 2}
PREFETCH_MODES = {"none": 0, "meta": 1, "all": 2}


def kivi_decode_attention_ref(q, kq: Optional[QuantizedTensor], vq: Optional[QuantizedTensor], k_res, v_res,
                              sm_scale: Optional[float] = None) -> torch.Tensor:
    """Torch reference: dequantize everything, concatenate, softmax attention in float32."""
    b, hq, d = q.shape
    parts_k, parts_v = [], []
    if kq is not None:
        parts_k.append(dequantize(kq, torch.float32, backend="torch"))
        parts_v.append(dequantize(vq, torch.float32, backend="torch"))
    if k_res is not None and k_res.shape[-2] > 0:
        parts_k.append(k_res.float())
        parts_v.append(v_res.float())
    k = torch.cat(parts_k, dim=-2)
    v = torch.cat(parts_v, dim=-2)
    rep = hq // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(d)
    s = torch.einsum("bhd,bhtd->bht", q.float(), k) * scale
    return torch.einsum("bht,bhtd->bhd", s.softmax(-1), v).to(q.dtype)


if HAS_TRITON:

    @triton.jit
    def _half(x, HI: tl.constexpr):
        """The low (``HI=0``) or high 16 bits of each uint32 of ``x`` read as fp16."""
        if HI:
            x = x >> 16
        return x.to(tl.uint16).to(tl.float16, bitcast=True)

    @triton.jit
    def _in_order(h0, h1, h2, h3, h4, h5, h6, h7, N: tl.constexpr):
        """The first ``N`` (2, 4 or 8) tensors joined so that their new innermost axes read ``h0, h1, ...``
        in row-major order (each join appends an axis of two: the even-indexed tensors go first)."""
        if N == 2:
            out = tl.join(h0, h1)
        elif N == 4:
            out = tl.join(tl.join(h0, h2), tl.join(h1, h3))
        else:
            out = tl.join(tl.join(tl.join(h0, h4), tl.join(h2, h6)), tl.join(tl.join(h1, h5), tl.join(h3, h7)))
        return out

    @triton.jit
    def _pair(wu, J: tl.constexpr, BITS: tl.constexpr):
        """Codes ``J`` and ``J + 16 // BITS`` of each word as the two halves of a uint32, each ORed into
        the fp16 bit pattern of 1024: read as fp16, a half is exactly 1024 + its code."""
        LOW: tl.constexpr = ((1 << BITS) - 1) * 65537
        return ((wu >> (J * BITS)) & LOW) | 0x64006400

    @triton.jit
    def _unpack_f16(w, BITS: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr):
        """The ``32 // BITS`` codes of each int32 word of the ``(R0, R1)`` tile ``w`` as exact fp16 values,
        along a new innermost axis (code ``j`` from bits ``j * BITS``). No int-to-float conversion (a
        quarter-rate instruction): each code is ORed into the fp16 pattern of 1024 and 1024 is subtracted,
        both exact; every step keeps a word's codes in the thread that loaded it."""
        HALF: tl.constexpr = 16 // BITS
        wu = w.to(tl.uint32, bitcast=True)
        x0 = _pair(wu, 0, BITS)
        x1 = _pair(wu, 1 % HALF, BITS)
        x2 = _pair(wu, 2 % HALF, BITS)
        x3 = _pair(wu, 3 % HALF, BITS)
        x4 = _pair(wu, 4 % HALF, BITS)
        x5 = _pair(wu, 5 % HALF, BITS)
        x6 = _pair(wu, 6 % HALF, BITS)
        x7 = _pair(wu, 7 % HALF, BITS)
        lo = _in_order(_half(x0, 0), _half(x1, 0), _half(x2, 0), _half(x3, 0), _half(x4, 0), _half(x5, 0),
                       _half(x6, 0), _half(x7, 0), HALF)
        hi = _in_order(_half(x0, 1), _half(x1, 1), _half(x2, 1), _half(x3, 1), _half(x4, 1), _half(x5, 1),
                       _half(x6, 1), _half(x7, 1), HALF)
        both = tl.join(lo, hi)  # (R0, R1, HALF..., 2): the last axis picks low or high half
        if HALF == 2:
            both = tl.permute(both, (0, 1, 3, 2))
        elif HALF == 4:
            both = tl.permute(both, (0, 1, 4, 2, 3))
        else:
            both = tl.permute(both, (0, 1, 5, 2, 3, 4))
        return tl.reshape(both, (R0, R1, 2 * HALF)) - 1024.0

    @triton.jit
    def _key_meta(ks, km, ku, start, hi, d, dmask, sks_g, sku_g, BLOCK_T: tl.constexpr, G: tl.constexpr,
                  DQ: tl.constexpr, DEQ_DTYPE: tl.constexpr):
        """Scale and minimum of each token group of the key tile at ``start`` (``(max(1, BLOCK_T // G),
        BLOCK_D)`` each; groups past ``hi`` read 0): small enough to be fetched a tile ahead."""
        NG: tl.constexpr = BLOCK_T // G if BLOCK_T >= G else 1
        gr = start // G + tl.arange(0, NG)
        gv = gr * G < hi
        goff = gr[:, None] * sks_g + d[None, :]
        k_s = tl.load(ks + goff, mask=gv[:, None] & dmask[None, :], other=0)
        k_m = tl.load(km + goff, mask=gv[:, None] & dmask[None, :], other=0)
        if DQ:  # 8-bit codes against their token group's (scale step, minimum base, minimum step)
            up = ku + gr * sku_g
            k_s = k_s.to(tl.float32) * tl.load(up, mask=gv, other=0.0).to(tl.float32)[:, None]
            k_m = (tl.load(up + 1, mask=gv, other=0.0).to(tl.float32)[:, None]
                   + k_m.to(tl.float32) * tl.load(up + 2, mask=gv, other=0.0).to(tl.float32)[:, None])
        return k_s.to(DEQ_DTYPE), k_m.to(DEQ_DTYPE)

    @triton.jit
    def _value_meta(vs, vm, vu, start, hi, svs_t, svu_g, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                    D: tl.constexpr, G: tl.constexpr, DQ: tl.constexpr, DEQ_DTYPE: tl.constexpr):
        """Scale and minimum of each channel group of each token of the value tile at ``start``:
        ``(BLOCK_T, BLOCK_D // G)`` each."""
        t = start + tl.arange(0, BLOCK_T)
        tmask = t < hi
        g = tl.arange(0, BLOCK_D // G)
        gmask = tmask[:, None] & (g * G < D)[None, :]
        voff = t[:, None] * svs_t + g[None, :]
        v_s = tl.load(vs + voff, mask=gmask, other=0)
        v_m = tl.load(vm + voff, mask=gmask, other=0)
        if DQ:
            up = vu + (t // G) * svu_g
            v_s = v_s.to(tl.float32) * tl.load(up, mask=tmask, other=0.0).to(tl.float32)[:, None]
            v_m = (tl.load(up + 1, mask=tmask, other=0.0).to(tl.float32)[:, None]
                   + v_m.to(tl.float32) * tl.load(up + 2, mask=tmask, other=0.0).to(tl.float32)[:, None])
        return v_s.to(DEQ_DTYPE), v_m.to(DEQ_DTYPE)

    @triton.jit
    def _key_words(kp, start, hi, d, dmask, skp_w, PWK: tl.constexpr, BLOCK_T: tl.constexpr):
        """The packed key words of the tile at ``start``: ``(BLOCK_T // PWK, BLOCK_D)`` int32."""
        w = start // PWK + tl.arange(0, BLOCK_T // PWK)
        return tl.load(kp + w[:, None] * skp_w + d[None, :], mask=(w * PWK < hi)[:, None] & dmask[None, :], other=0)

    @triton.jit
    def _value_words(vp, start, hi, svp_t, PWV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                     D: tl.constexpr):
        """The packed value words of the tile at ``start``: ``(BLOCK_T, BLOCK_D // PWV)`` int32."""
        t = start + tl.arange(0, BLOCK_T)
        c = tl.arange(0, BLOCK_D // PWV)
        return tl.load(vp + t[:, None] * svp_t + c[None, :], mask=(t < hi)[:, None] & (c * PWV < D)[None, :], other=0)

    @triton.jit
    def _per_row(x, R: tl.constexpr, C: tl.constexpr):
        """``(N, C)`` rows repeated to ``(R, C)`` (each ``R // N`` times, in order)."""
        N: tl.constexpr = x.shape[0]
        return tl.reshape(tl.broadcast_to(x[:, None, :], (N, R // N, C)), (R, C))

    @triton.jit
    def _per_col(x, R: tl.constexpr, C: tl.constexpr):
        """``(R, N)`` columns repeated to ``(R, C)`` (each ``C // N`` times, in order)."""
        N: tl.constexpr = x.shape[1]
        return tl.reshape(tl.broadcast_to(x[:, :, None], (R, N, C // N)), (R, C))

    @triton.jit
    def _program_start(Q, sq_b, sq_h, H_KV, N_REP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
                       BLOCK_D: tl.constexpr, DOT_DTYPE: tl.constexpr):
        """This program's sequence and kv head, its query heads (all of the GQA group) and their queries,
        and an empty online-softmax state: ``(b, hk, heads, hmask, d, dmask, q, m_i, l_i, acc)``."""
        pid = tl.program_id(0)
        b = pid // H_KV
        hk = pid % H_KV
        hs = tl.arange(0, BLOCK_H)
        hmask = hs < N_REP
        heads = hk * N_REP + hs
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=hmask[:, None] & dmask[None, :],
                    other=0.0).to(DOT_DTYPE)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        return b, hk, heads, hmask, d, dmask, q, m_i, l_i, acc

    @triton.jit
    def _cache_pointers(KP, KS, KM, VP, VS, VM, KU, VU, b, hk, skp_b, skp_h, sks_b, sks_h, svp_b, svp_h, svs_b, svs_h,
                        sku_b, sku_h, svu_b, svu_h):
        """The packed words, scales, minimums and super-scales of keys and values of sequence ``b``, kv head
        ``hk``: ``(kp, ks, km, vp, vs, vm, ku, vu)``."""
        return (KP + b * skp_b + hk * skp_h, KS + b * sks_b + hk * sks_h, KM + b * sks_b + hk * sks_h,
                VP + b * svp_b + hk * svp_h, VS + b * svs_b + hk * svs_h, VM + b * svs_b + hk * svs_h,
                KU + b * sku_b + hk * sku_h, VU + b * svu_b + hk * svu_h)

    @triton.jit
    def _attend_full(q, m_i, l_i, acc, kr, vr, lo, hi, skr_t, svr_t, qk_scale, d, dmask, vcol, BLOCK_T: tl.constexpr,
                     DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
        """The online softmax carried over full-precision tokens ``[lo, hi)`` (the recent window); column ``j``
        of ``acc`` holds channel ``vcol[j]``."""
        for start in range(lo, hi, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            tmask = t < hi
            m2 = tmask[:, None] & dmask[None, :]
            k = tl.load(kr + t[:, None] * skr_t + d[None, :], mask=m2, other=0.0).to(DOT_DTYPE)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(vr + t[:, None] * svr_t + vcol[None, :], mask=m2, other=0.0).to(DOT_DTYPE)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _store_partial(OA, OML, acc, m_i, l_i, b, heads, hmask, split, d, dmask, soa_b, soa_h, soa_s, soml_b,
                       soml_h, soml_s):
        """One split's unnormalised output (column ``j`` of ``acc`` to channel ``d[j]``), running maximum and
        denominator, for the merge kernel."""
        tl.store(OA + b * soa_b + heads[:, None] * soa_h + split * soa_s + d[None, :], acc,
                 mask=hmask[:, None] & dmask[None, :])
        tl.store(OML + b * soml_b + heads * soml_h + split * soml_s, m_i, mask=hmask)
        tl.store(OML + b * soml_b + heads * soml_h + split * soml_s + 1, l_i, mask=hmask)

    @triton.jit
    def _codes8(w):
        """The eight 4-bit codes of each int32 word of an mma-ordered cache as exact fp16 values of 1024 + code,
        along three new axes of two ``(i0, i1, i2)``: code ``c = i0 + 2 i1 + 4 i2``, stored at bits
        ``4 (4 i0 + i1 + 2 i2)`` (``kv_quant`` interleaves the nibbles so): the two codes a tensor-core operand
        wants side by side in one register (``i0`` = 0, 1) are the two halves of one masked word, and reach the
        operand without a byte permute."""
        wu = w.to(tl.uint32, bitcast=True)
        e0 = tl.join(_half(_pair(wu, 0, 4), 0), _half(_pair(wu, 0, 4), 1))  # (i1, i2) = (0, 0); last axis i0
        e1 = tl.join(_half(_pair(wu, 1, 4), 0), _half(_pair(wu, 1, 4), 1))  # (1, 0)
        e2 = tl.join(_half(_pair(wu, 2, 4), 0), _half(_pair(wu, 2, 4), 1))  # (0, 1)
        e3 = tl.join(_half(_pair(wu, 3, 4), 0), _half(_pair(wu, 3, 4), 1))  # (1, 1)
        return tl.join(tl.join(e0, e1), tl.join(e2, e3))

    @triton.jit
    def _codes16(w):
        """The sixteen 2-bit codes of each int32 word of an mma-ordered cache as exact fp16 values of 1024 +
        code, along four new axes of two ``(i0, i1, i2, i3)``: code ``c = i0 + 2 i1 + 4 i2 + 8 i3``, stored at
        bits ``2 (8 i0 + i1 + 2 i2 + 4 i3)`` (as :func:`_codes8`: an operand's register pair is one word's
        two halves)."""
        wu = w.to(tl.uint32, bitcast=True)
        e0 = tl.join(_half(_pair(wu, 0, 2), 0), _half(_pair(wu, 0, 2), 1))
        e1 = tl.join(_half(_pair(wu, 1, 2), 0), _half(_pair(wu, 1, 2), 1))
        e2 = tl.join(_half(_pair(wu, 2, 2), 0), _half(_pair(wu, 2, 2), 1))
        e3 = tl.join(_half(_pair(wu, 3, 2), 0), _half(_pair(wu, 3, 2), 1))
        e4 = tl.join(_half(_pair(wu, 4, 2), 0), _half(_pair(wu, 4, 2), 1))
        e5 = tl.join(_half(_pair(wu, 5, 2), 0), _half(_pair(wu, 5, 2), 1))
        e6 = tl.join(_half(_pair(wu, 6, 2), 0), _half(_pair(wu, 6, 2), 1))
        e7 = tl.join(_half(_pair(wu, 7, 2), 0), _half(_pair(wu, 7, 2), 1))
        return tl.join(tl.join(tl.join(e0, e1), tl.join(e2, e3)), tl.join(tl.join(e4, e5), tl.join(e6, e7)))

    # The pair's dequantization: $1 is the word of both elements (the second copy, $2, is not read: Triton
    # must hand the asm the two elements of one pair, which benches/gpu_sass.py --check-pairs verifies in the
    # compiled PTX, and tests/test_gpu_kernels.py with it); $3: the pair's mask (0x000F000F, or 0x00F000F0 for
    # the codes at bits 4-7 and 20-23, so that a word is shifted once for its four pairs, not three times);
    # $5, $6: the pair's code = (1024 + code) * 1 - 1024, or (1024 + 16 code) / 16 - 64, both exact; $7, $8:
    # the pair's scales and minimums.
    _PAIR_ASM = tl.constexpr("{ .reg .b32 c, t; mov.b32 c, 0x64006400; lop3.b32 t, $1, $3, c, 0xEA;"
                             " fma.rn.f16x2 t, t, $5, $6; fma.rn.f16x2 $0, t, $7, $8; }")

    # The same without the scaling: the codes alone, as exact fp16 values (two instructions a pair).
    _CODES_ASM = tl.constexpr("{ .reg .b32 c, t; mov.b32 c, 0x64006400; lop3.b32 t, $1, $3, c, 0xEA;"
                              " fma.rn.f16x2 $0, t, $5, $6; }")

    @triton.jit
    def _word_pairs8(w):
        """The four code pairs of each 4-bit mma-ordered int32 word (see :func:`_codes8`) as ``(words, masks)``,
        uint32, along two new axes ``(i1, i2)``: pair ``(i1, i2)`` = codes ``i0 + 2 i1 + 4 i2`` for ``i0 = 0,
        1``, at bits ``16 i0 + 8 i2 + 4 i1`` of the word, i.e. the bits ``masks`` selects of ``words`` (the word
        shifted by ``8 i2``: one shift a word)."""
        wu = w.to(tl.uint32, bitcast=True)
        w8 = wu >> 8
        lo = tl.zeros_like(wu) + 0x000F000F
        hi = tl.zeros_like(wu) + 0x00F000F0
        return tl.join(tl.join(wu, wu), tl.join(w8, w8)), tl.join(tl.join(lo, hi), tl.join(lo, hi))

    @triton.jit
    def _pair_scale(k):
        """``(a, b)``, fp16 with a new innermost axis of two: ``(1024 + code) a + b`` = code for the pairs
        masked by ``k`` at bits 0-3 (``a`` = 1, ``b`` = -1024), and ``(1024 + 16 code) a + b`` = code for those at
        bits 4-7 (``a`` = 1/16, ``b`` = -64); both exact."""
        low = k == 0x000F000F
        a = tl.where(low, 1.0, 0.0625).to(tl.float16)
        b = tl.where(low, -1024.0, -64.0).to(tl.float16)
        return tl.join(a, a), tl.join(b, b)

    @triton.jit
    def _masked_halves(x, k):
        """The pairs of ``x`` masked by ``k`` and ORed into the fp16 pattern of 1024, as fp16 along a new
        innermost axis (the interpreter's arithmetic for the asm's first instruction)."""
        y = (x & k) | 0x64006400
        return tl.join(_half(y, 0), _half(y, 1))

    @triton.jit
    def _dequant_pairs(xk, s, m, ASM: tl.constexpr):
        """``code * s + m`` in fp16 for the code pairs ``xk = (words, masks)`` (from :func:`_word_pairs8`; the
        pair along a new innermost axis ``i0`` of the result) with ``s``, ``m`` fp16 of the result's shape.
        ``ASM``: three f16x2 instructions a pair (mask-and-or into the fp16 pattern of 1024 + code or 1024 +
        16 code, back to the code, fused multiply-add), so that each pair stays one 32-bit register from the
        load to the dot operand. Without it (the CPU interpreter runs no PTX) the same arithmetic in Triton
        operations."""
        x, k = xk
        a, b = _pair_scale(k)
        if ASM:
            return tl.inline_asm_elementwise(_PAIR_ASM, "=r,r,r,r,r,r,r,r,r", [tl.join(x, x), tl.join(k, k), a, b, s,
                                                                          m], dtype=tl.float16, is_pure=True, pack=2)
        else:
            return (_masked_halves(x, k) * a + b) * s + m

    # A pair's codes as fp16 subnormals: the masked word itself, each half code x 2^-24 (x 2^-20 at bits 4-7)
    _SUBNORMALS_ASM = tl.constexpr("and.b32 $0, $1, $3;")

    @triton.jit
    def _pair_subnormals(xk, ASM: tl.constexpr):
        """The code pairs ``xk`` (as in :func:`_dequant_pairs`) as exact fp16 subnormals, code x 2^-24 for the
        pairs masked at bits 0-3 and code x 2^-20 for those at bits 4-7: one AND a pair, no offset to take
        off (tensor cores multiply fp16 subnormals exactly)."""
        x, k = xk
        if ASM:
            return tl.inline_asm_elementwise(_SUBNORMALS_ASM, "=r,r,r,r,r", [tl.join(x, x), tl.join(k, k)],
                                             dtype=tl.float16, is_pure=True, pack=2)
        else:
            y = x & k
            return tl.join(_half(y, 0), _half(y, 1))

    @triton.jit
    def _pair_codes(xk, ASM: tl.constexpr):
        """The code pairs ``xk`` (as in :func:`_dequant_pairs`) as exact fp16 values, not yet scaled."""
        x, k = xk
        a, b = _pair_scale(k)
        if ASM:
            return tl.inline_asm_elementwise(_CODES_ASM, "=r,r,r,r,r,r,r", [tl.join(x, x), tl.join(k, k), a, b],
                                             dtype=tl.float16, is_pure=True, pack=2)
        else:
            return _masked_halves(x, k) * a + b

    @triton.jit
    def _mma_operand2(w, KA: tl.constexpr, NB: tl.constexpr):
        """:func:`_mma_operand` for 2-bit words ``(4 w, 8 nl, 4 kl, KA, NB // 2)``: the high eight codes of a word
        belong to column ``r + 1`` (``r`` even), i.e. ``r = 2 (word's r) + i3``."""
        c = _codes16(w)  # (w, nl, kl, a, r2, i0, i1, i2, i3)
        c = tl.permute(c, (3, 7, 2, 6, 5, 4, 8, 0, 1))  # (a, i2, kl, i1, i0, r2, i3, w, nl)
        return tl.reshape(c, (32 * KA, 32 * NB))

    @triton.jit
    def _mma_operand(w, KA: tl.constexpr, NB: tl.constexpr):
        """A dot operand of ``(32 KA, 32 NB)`` fp16 codes (+1024) from words ``(4 w, 8 nl, 4 kl, KA, NB)`` in
        mma order (``kv_quant.to_mma_order``): element ``(32 a + 16 i2 + 4 kl + 2 i1 + i0, 32 r + 8 w + nl)``
        is code ``i0 + 2 i1 + 4 i2`` of word ``(w, nl, kl, a, r)``. Thread ``32 w + 4 nl + kl`` loads those words,
        which is where Triton's fp16 mma operand layout (kWidth 4) wants their codes: no layout conversion."""
        c = _codes8(w)  # (w, nl, kl, a, r, i0, i1, i2)
        c = tl.permute(c, (3, 7, 2, 6, 5, 4, 0, 1))  # (a, i2, kl, i1, i0, r, w, nl)
        return tl.reshape(c, (32 * KA, 32 * NB))

    @triton.jit
    def _key_cols(x, D: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr):
        """Key scales or minimums ``(BLOCK_T // G or 1, D)`` of a tile spread over K^T's columns ``n = nl + 8 w +
        32 r`` (token ``nl + 8 r + BLOCK_T // 4 * w``, group ``BLOCK_T // 4 * w // G``): ``(D, BLOCK_T)``."""
        xt = tl.trans(x)
        if G >= BLOCK_T:
            out = tl.broadcast_to(xt, (D, BLOCK_T))
        else:
            NG: tl.constexpr = BLOCK_T // G
            out = tl.reshape(tl.broadcast_to(xt[:, None, :, None], (D, BLOCK_T // 32, NG, 32 // NG)), (D, BLOCK_T))
        return out

    @triton.jit
    def _value_cols(x, D: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr):
        """Value scales or minimums ``(BLOCK_T, D // G)`` spread over V's columns ``n = nl + 8 w + 32 r``
        (channel ``nl + 8 r + D // 4 * w``, group ``D // 4 * w // G``): ``(BLOCK_T, D)``."""
        NG: tl.constexpr = D // G
        NR: tl.constexpr = D // 32
        return tl.reshape(tl.broadcast_to(x[:, None, :, None, None], (BLOCK_T, NR, NG, 4 // NG, 8)), (BLOCK_T, D))

    @triton.jit
    def _q_rows(Q, qrow, kl, rmask, i2: tl.constexpr, b: tl.constexpr):
        """Four consecutive query channels ``32 b + 16 i2 + 4 kl + (0..3)`` of row ``qrow`` a thread: (128, 4)."""
        off = (32 * b + 16 * i2 + 4 * kl)[:, None] + tl.arange(0, 4)[None, :]
        return tl.load(Q + qrow[:, None] + off, mask=rmask[:, None], other=0.0)

    @triton.jit
    def _q_half(Q, qrow, kl, rmask, NB: tl.constexpr):
        """All ``D = 32 NB`` channels of one query row a thread, as ``(128, 4, 2 i2, b bits...)``."""
        if NB == 1:
            x = tl.join(_q_rows(Q, qrow, kl, rmask, 0, 0), _q_rows(Q, qrow, kl, rmask, 1, 0))
        elif NB == 2:
            x = tl.join(tl.join(_q_rows(Q, qrow, kl, rmask, 0, 0), _q_rows(Q, qrow, kl, rmask, 1, 0)),
                        tl.join(_q_rows(Q, qrow, kl, rmask, 0, 1), _q_rows(Q, qrow, kl, rmask, 1, 1)))
        elif NB == 4:
            x = tl.join(tl.join(tl.join(_q_rows(Q, qrow, kl, rmask, 0, 0), _q_rows(Q, qrow, kl, rmask, 1, 0)),
                                tl.join(_q_rows(Q, qrow, kl, rmask, 0, 1), _q_rows(Q, qrow, kl, rmask, 1, 1))),
                        tl.join(tl.join(_q_rows(Q, qrow, kl, rmask, 0, 2), _q_rows(Q, qrow, kl, rmask, 1, 2)),
                                tl.join(_q_rows(Q, qrow, kl, rmask, 0, 3), _q_rows(Q, qrow, kl, rmask, 1, 3))))
        else:
            x = tl.join(_q_half(Q, qrow, kl, rmask, 4), _q_half(Q + 128, qrow, kl, rmask, 4))
        return x

    @triton.jit
    def _q_operand(Q, qb, sq_h, hk, N_REP: tl.constexpr, D: tl.constexpr):
        """The queries of a GQA group (up to 16 heads, fp16) as a ``(16, D)`` dot operand built in the layout
        of its mma fragments (thread ``32 w + 4 nl + kl`` holds rows ``nl``, ``nl + 8`` and channels
        ``32 b + 16 i2 + 4 kl + (0..3)``, every warp the same), so that it stays in registers for the whole
        loop instead of being read back from shared memory for every tile."""
        NB: tl.constexpr = D // 32
        th = tl.arange(0, 128)
        nl = (th // 4) % 8
        kl = th % 4
        lo = _q_half(Q + qb, (hk * N_REP + nl) * sq_h, kl, nl < N_REP, NB)
        hi = _q_half(Q + qb, (hk * N_REP + nl + 8) * sq_h, kl, nl + 8 < N_REP, NB)
        x = tl.join(lo, hi)  # (128, 4, 2 i2, b bits low to high..., 2 rm)
        if NB == 1:
            x = tl.max(tl.reshape(x, (4, 8, 4, 4, 2, 2)), axis=0)  # (nl, kl, 4, i2, rm), the same in every warp
            x = tl.permute(x, (4, 0, 3, 1, 2))  # (rm, nl, i2, kl, 4)
        elif NB == 2:
            x = tl.max(tl.reshape(x, (4, 8, 4, 4, 2, 2, 2)), axis=0)  # (nl, kl, 4, i2, b0, rm)
            x = tl.permute(x, (5, 0, 4, 3, 1, 2))
        elif NB == 4:
            x = tl.max(tl.reshape(x, (4, 8, 4, 4, 2, 2, 2, 2)), axis=0)  # (nl, kl, 4, i2, b0, b1, rm)
            x = tl.permute(x, (6, 0, 5, 4, 3, 1, 2))
        else:
            x = tl.max(tl.reshape(x, (4, 8, 4, 4, 2, 2, 2, 2, 2)), axis=0)  # (nl, kl, 4, i2, b0, b1, b2, rm)
            x = tl.permute(x, (7, 0, 6, 5, 4, 3, 1, 2))
        return tl.reshape(x, (16, D)).to(tl.float16)

    @triton.jit
    def _qt_operand(Q, qb, sq_h, hk, N_REP: tl.constexpr, D: tl.constexpr):
        """Q^T of a GQA group of up to 8 heads (fp16, head size 64 or 128) as the warps kernel's ``(4, D, 8)``
        B operand of K Q^T, built in the layout of its mma fragments as the keys' words are (thread ``32 w +
        4 nl + kl`` holds head ``nl``'s channels ``32 a + 16 i2 + 4 kl + (0..3)``, every warp the same), so that
        it stays in registers for the whole loop."""
        th = tl.arange(0, 128)
        nl = (th // 4) % 8
        return _b_fragments(_q_half(Q + qb, (hk * N_REP + nl) * sq_h, th % 4, nl < N_REP, D // 32), D)

    @triton.jit
    def _b_fragments(x, D: tl.constexpr):
        """Per-thread channel runs ``(128, 4, 2 i2, a bits...)`` (as :func:`_q_half` loads them; thread ``32 w +
        4 nl + kl``) as the warps kernel's ``(4, D, 8)`` B operand of K Q^T, column ``nl``: no data moves."""
        if D == 64:
            x = tl.permute(tl.reshape(x, (4, 8, 4, 4, 2, 2)), (0, 5, 4, 2, 3, 1))  # (w, a, i2, kl, 4, nl)
        else:
            x = tl.permute(tl.reshape(x, (4, 8, 4, 4, 2, 2, 2)), (0, 6, 5, 4, 2, 3, 1))  # (w, a1, a0, i2, kl, 4, nl)
        return tl.reshape(x, (4, D, 8)).to(tl.float16)

    @triton.jit
    def _ks_operand(ks, ku, start, hi, sks_g, sku_g, G: tl.constexpr, DQ: tl.constexpr, D: tl.constexpr,
                    MASKED: tl.constexpr):
        """The key scales of each warp's token group of the tile at ``start`` in the layout of
        :func:`_qt_operand` (``(4, D, 8)``, the same for the 8 heads; fp16; ``MASKED``: groups past ``hi``
        read 0), so that they scale Q^T in place: each thread loads those of its own channels (the 8 lanes of
        a channel set load the same bytes, from L1: :func:`_warps_meta_load` prefetched them)."""
        th = tl.arange(0, 128)
        gr = _udiv(start + 16 * (th // 32), G)
        if MASKED:
            valid = gr * G < hi
        else:
            valid = th >= 0
        x = _b_fragments(_q_half(ks, gr * sks_g, th % 4, valid, D // 32), D)
        if DQ:  # 8-bit codes times their group's scale step (one a warp)
            gw = _udiv(start + 16 * tl.arange(0, 4), G)
            st = tl.load(ku + gw * sku_g, mask=(gw * G < hi) | (not MASKED), other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * st[:, None, None]).to(tl.float16)
        return x

    # A hint: the line at $1 into L1 (no register waits for it; $0 is a dummy)
    _PREFETCH_ASM = tl.constexpr("prefetch.global.L1 [$1]; mov.b32 $0, 0;")

    @triton.jit
    def _thread_words(ptr, off, mask, N: tl.constexpr, MASKED: tl.constexpr = True):
        """A thread's ``N`` adjacent packed words ``(128, N, R)`` from offsets ``(128, min(N, 4), R)`` (key
        words of both mma kernels, value words of the warps kernel): at most four (16 bytes) a load, so that
        Triton keeps each thread's words in its own registers (eight adjacent words in one load would be
        split over two lanes, and the operand would then pass through shared memory)."""
        w = _ld(ptr + off, mask, 0, MASKED)
        if N == 8:
            hi = _ld(ptr + off + 4, mask, 0, MASKED)
            w = tl.reshape(tl.permute(tl.join(w, hi), (0, 3, 1, 2)), (128, 8, off.shape[2]))
        return w

    @triton.jit
    def _kivi_decode_mma_kernel(
        Q, KP, KS, KM, VP, VS, VM, KU, VU, KR, VR, OA, OML,
        Tq, Tr, chunk_q, chunk_r, qk_scale, H_KV,
        sq_b, sq_h,
        skp_b, skp_h, skp_t, sks_b, sks_h, sks_g,
        svp_b, svp_h, svp_r, svs_b, svs_h, svs_t,
        sku_b, sku_h, sku_g, svu_b, svu_h, svu_g,
        skr_b, skr_h, skr_t, svr_b, svr_h, svr_t,
        soa_b, soa_h, soa_s, soml_b, soml_h, soml_s,
        D: tl.constexpr, N_REP: tl.constexpr, BLOCK_H: tl.constexpr, G: tl.constexpr, DQ: tl.constexpr,
        BLOCK_T: tl.constexpr, BITS: tl.constexpr, Q_REGS: tl.constexpr,
    ):
        """:func:`_kivi_decode_kernel` for 4- or 2-bit caches packed in mma order, 64- or 128-token tiles, 4 warps: each
        thread loads the words of its own dot-operand fragments and dequantizes them in registers, so
        neither K nor V passes through shared memory. The next tile's words and metadata are fetched
        while this one is computed."""
        NB: tl.constexpr = D // 32
        RT: tl.constexpr = BLOCK_T // 32
        PK: tl.constexpr = 2 if BITS == 2 else 1  # dot columns a word covers
        split = tl.program_id(1)
        b, hk, heads, hmask, d, dmask, q, m_i, l_i, acc = _program_start(Q, sq_b, sq_h, H_KV, N_REP, BLOCK_H, D, D,
                                                                          tl.float16)
        if Q_REGS:  # the same queries, loaded straight into their mma fragments (BLOCK_H 16)
            q = _q_operand(Q, b * sq_b, sq_h, hk, N_REP, D)
        lo = split * chunk_q
        hi = tl.minimum(lo + chunk_q, Tq)
        kp, ks, km, vp, vs, vm, ku, vu = _cache_pointers(KP, KS, KM, VP, VS, VM, KU, VU, b, hk, skp_b, skp_h, sks_b,
                                                         sks_h, svp_b, svp_h, svs_b, svs_h, sku_b, sku_h, svu_b, svu_h)
        # Thread 32 w + 4 nl + kl holds, of the K^T operand (D x BLOCK_T), column n = nl + 8 w + 32 r (r < RT)
        # for D / 4 of the channels, and of the V operand (BLOCK_T x D) column n = nl + 8 w + 32 r (r < NB) for
        # BLOCK_T / 4 tokens. Which token and channel a column stands for is ours to choose: column n of K^T
        # is token nl + 8 r + 8 RT w and column n of V is channel nl + 8 r + 8 NB w, so that each thread's
        # columns share one quantization group (G >= BLOCK_T / 4 for keys, G >= D / 4 for values): D / 4 key
        # and BLOCK_T / 4 value scale/minimum pairs a tile instead of RT and NB times as many. The scores come
        # out in that token order (put back in order before p meets V, in the shared-memory hop p takes
        # anyway) and acc in that channel order.
        th = tl.arange(0, 128)
        w_ = th // 32
        nl = (th // 4) % 8
        kl = th % 4
        kb = tl.arange(0, NB if NB < 4 else 4)  # key words a load (see _thread_words)
        rr = tl.arange(0, RT)
        kr_ = tl.arange(0, RT // PK)
        vc_ = tl.arange(0, NB // PK)
        # first token of each key word: (128, 1, RT // PK); a 2-bit word also holds the token 8 after it
        k_tok = (nl + 8 * RT * w_)[:, None, None] + 8 * PK * kr_[None, None, :]
        if BITS == 4:
            k_row = k_tok
            v_col = (nl + 8 * NB * w_)[:, None, None] + 8 * vc_[None, None, :]
        else:  # 2-bit rows hold token pairs (t, t + 8), columns channel pairs (n, n + 8)
            k_row = (nl + 4 * RT * w_)[:, None, None] + 8 * kr_[None, None, :]
            v_col = (nl + 4 * NB * w_)[:, None, None] + 8 * vc_[None, None, :]
        k_off = k_row * skp_t + (kl[:, None, None] * NB + kb[None, :, None])  # (128, <= 4, RT // PK): word kl NB + a
        v_off = (4 * rr[None, :, None] + kl[:, None, None]) * svp_r + v_col  # (128, RT, NB // PK): row 4 a + kl
        n = tl.arange(0, BLOCK_T)
        tok = (n % 8) + 8 * (n // 32) + 8 * RT * ((n // 8) % 4)  # token of score column n
        n = tl.arange(0, D)
        chan = (n % 8) + 8 * (n // 32) + 8 * NB * ((n // 8) % 4)  # channel of acc column n

        k_s_nx, k_m_nx = _key_meta(ks, km, ku, lo, hi, d, dmask, sks_g, sku_g, BLOCK_T, G, DQ, tl.float16)
        v_s_nx, v_m_nx = _value_meta(vs, vm, vu, lo, hi, svs_t, svu_g, BLOCK_T, D, D, G, DQ, tl.float16)
        kw_nx = _thread_words(kp + (lo // PK) * skp_t, k_off, (lo + k_tok) < hi, NB)
        vw_nx = tl.load(vp + (lo // 8) * svp_r + v_off, mask=(lo + 32 * rr[None, :, None]) < hi, other=0)
        for start in range(lo, hi, BLOCK_T):
            k_s, k_m, v_s, v_m, kw, vw = k_s_nx, k_m_nx, v_s_nx, v_m_nx, kw_nx, vw_nx
            nxt = start + BLOCK_T
            k_s_nx, k_m_nx = _key_meta(ks, km, ku, nxt, hi, d, dmask, sks_g, sku_g, BLOCK_T, G, DQ, tl.float16)
            v_s_nx, v_m_nx = _value_meta(vs, vm, vu, nxt, hi, svs_t, svu_g, BLOCK_T, D, D, G, DQ, tl.float16)
            kw_nx = _thread_words(kp + (nxt // PK) * skp_t, k_off, (nxt + k_tok) < hi, NB)
            vw_nx = tl.load(vp + (nxt // 8) * svp_r + v_off, mask=(nxt + 32 * rr[None, :, None]) < hi, other=0)

            if BITS == 4:
                kt = _mma_operand(tl.reshape(kw, (4, 8, 4, NB, RT)), NB, RT) - 1024.0  # K^T: (D, BLOCK_T)
            else:
                kt = _mma_operand2(tl.reshape(kw, (4, 8, 4, NB, RT // 2)), NB, RT) - 1024.0
            kt = kt * _key_cols(k_s, D, G, BLOCK_T) + _key_cols(k_m, D, G, BLOCK_T)
            s = tl.dot(q, kt) * qk_scale
            s = tl.where((start + tok < hi)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            # columns (r, w, nl) -> tokens (w, r, nl), i.e. in order
            p = tl.reshape(tl.permute(tl.reshape(p.to(tl.float16), (BLOCK_H, RT, 4, 8)), (0, 2, 1, 3)), (BLOCK_H, BLOCK_T))
            if BITS == 4:
                v = _mma_operand(tl.reshape(vw, (4, 8, 4, RT, NB)), RT, NB) - 1024.0  # V: (BLOCK_T, D)
            else:
                v = _mma_operand2(tl.reshape(vw, (4, 8, 4, RT, NB // 2)), RT, NB) - 1024.0
            v = v * _value_cols(v_s, D, G, BLOCK_T) + _value_cols(v_m, D, G, BLOCK_T)
            acc = acc * alpha[:, None] + tl.dot(p, v)
            m_i = m_new

        m_i, l_i, acc = _attend_full(q, m_i, l_i, acc, KR + b * skr_b + hk * skr_h, VR + b * svr_b + hk * svr_h,
                                     split * chunk_r, tl.minimum(split * chunk_r + chunk_r, Tr), skr_t, svr_t,
                                     qk_scale, d, dmask, chan, BLOCK_T, tl.float16, "tf32")
        _store_partial(OA, OML, acc, m_i, l_i, b, heads, hmask, split, chan, dmask, soa_b, soa_h, soa_s, soml_b,
                       soml_h, soml_s)


    @triton.jit
    def _udiv(x, N: tl.constexpr):
        """``x // N`` for ``x >= 0`` (token indices): as unsigned, a power of two ``N`` is one shift, with no
        rounding fix-up for negative values."""
        return (x.to(tl.uint32) // N).to(tl.int32)

    @triton.jit
    def _ld(ptr, mask, other, MASKED: tl.constexpr):
        """``tl.load`` under ``mask`` when ``MASKED``, else unmasked (a tile known to be whole: no predicates
        and no zero-fill instructions)."""
        if MASKED:
            x = tl.load(ptr, mask=mask, other=other)
        else:
            x = tl.load(ptr)
        return x

    @triton.jit
    def _value_meta_frag(vs, vm, vu, start, hi, svs_t, svu_g, w_, nl, kl, NS: tl.constexpr, G: tl.constexpr,
                         DQ: tl.constexpr, MASKED: tl.constexpr = True):
        """Scale and minimum of each value a thread of the warps kernel holds, loaded by that thread: its 4
        tokens ``start + 16 w + 4 kl + (2 i1 + i0)`` in its channel group ``nl // NS``, ``(128, 4)`` each (no
        layout conversion on the way to its codes; ``MASKED``: tokens past ``hi`` read 0). ``vs``, ``vm``:
        each thread's base pointers, its group's column (with token-contiguous scales, ``svs_t`` = 1, the 4
        tokens are one load)."""
        t = start + (16 * w_ + 4 * kl)[:, None] + tl.arange(0, 4)[None, :]
        tmask = t < hi
        off = t * svs_t
        v_s = _ld(vs[:, None] + off, tmask, 0, MASKED)
        v_m = _ld(vm[:, None] + off, tmask, 0, MASKED)
        if DQ:
            up = vu + (t // G) * svu_g
            v_s = v_s.to(tl.float32) * _ld(up, tmask, 0.0, MASKED).to(tl.float32)
            v_m = (_ld(up + 1, tmask, 0.0, MASKED).to(tl.float32)
                   + v_m.to(tl.float32) * _ld(up + 2, tmask, 0.0, MASKED).to(tl.float32))
        return v_s.to(tl.float16), v_m.to(tl.float16)

    @triton.jit
    def _key_meta_frag(ks, km, ku, start, hi, w_, kl, sks_g, sku_g, NB: tl.constexpr, G: tl.constexpr,
                       DQ: tl.constexpr, MASKED: tl.constexpr = True):
        """Scale and minimum of each key a thread of the warps kernel holds, loaded by that thread: channels
        ``32 a + 16 i2 + 4 kl + 2 i1 + i0`` in the token group of its warp's 16 tokens, ``(128, NB, 2 i2, 2 i1,
        2 i0)`` each (``MASKED``: groups past ``hi`` read 0)."""
        gr = (start + 16 * w_) // G  # (128,)
        gv = gr * G < hi
        # four adjacent channels (2 i1 + i0) a load of 8 bytes
        ch = (32 * tl.arange(0, NB))[:, None, None] + (16 * tl.arange(0, 2))[None, :, None] + tl.arange(0, 4)[None, None, :]
        off = (gr * sks_g + 4 * kl)[:, None, None, None] + ch[None]
        mask = gv[:, None, None, None]
        k_s = _ld(ks + off, mask, 0, MASKED)
        k_m = _ld(km + off, mask, 0, MASKED)
        if DQ:
            up = ku + gr * sku_g
            k_s = k_s.to(tl.float32) * _ld(up, gv, 0.0, MASKED).to(tl.float32)[:, None, None, None]
            k_m = (_ld(up + 1, gv, 0.0, MASKED).to(tl.float32)[:, None, None, None]
                   + k_m.to(tl.float32) * _ld(up + 2, gv, 0.0, MASKED).to(tl.float32)[:, None, None, None])
        return tl.reshape(k_s.to(tl.float16), (128, NB, 2, 2, 2)), tl.reshape(k_m.to(tl.float16), (128, NB, 2, 2, 2))

    @triton.jit
    def _key_frag(x, NB: tl.constexpr):
        """A thread's key scales or minimums (see :func:`_key_meta_frag`) spread over its codes as the warps
        kernel dequantizes them: ``(w, nl, kl, a, r, i1, i2, i0)``."""
        x = tl.permute(tl.reshape(x, (4, 8, 4, NB, 2, 2, 2)), (0, 1, 2, 3, 5, 4, 6))  # (w, nl, kl, a, i1, i2, i0)
        return tl.broadcast_to(tl.reshape(x, (4, 8, 4, NB, 1, 2, 2, 2)), (4, 8, 4, NB, 2, 2, 2, 2))

    @triton.jit
    def _value_frag(x, NJ: tl.constexpr):
        """A thread's value scales or minimums ``(128, 4)`` (see :func:`_value_meta_frag`) spread over its codes
        as the warps kernel dequantizes them: ``(w, nl, kl, j, i1, i2, i0)``."""
        return tl.broadcast_to(tl.reshape(x, (4, 8, 4, 1, 2, 1, 2)), (4, 8, 4, NJ, 2, 2, 2))

    @triton.jit
    def _warps_meta_load(ks, km, ku, vs, vm, vu, start, hi, w_, nl, kl, sks_g, sku_g, svs_t, svu_g, d, dmask,
                         NB: tl.constexpr, NS: tl.constexpr, G: tl.constexpr, DQ: tl.constexpr,
                         KEY_META_REGS: tl.constexpr, MASKED: tl.constexpr, kb, skb_g,
                         FOLD: tl.constexpr):
        """The key and value scales and minimums the warps kernel's threads need for the 64-token tile at
        ``start`` (``MASKED``: tokens past ``hi`` read 0; else the tile must be whole). ``FOLD``: instead of
        the key minimums, each warp's token group's score offsets ``kb`` (``(4 warps, 8 heads)`` float32)."""
        if KEY_META_REGS:
            k_s, k_m = _key_meta_frag(ks, km, ku, start, hi, w_, kl, sks_g, sku_g, NB, G, DQ, MASKED)
        elif FOLD:  # the scales are read at their tile (_ks_operand); here only prefetched into L1 (FOLD 2: PTX,
            # not in the interpreter; the last valid group's row stands in for groups past the end)
            if FOLD == 2:
                th = tl.arange(0, 128)
                gr = tl.minimum(_udiv(start + 16 * (th // 32), G), _udiv(tl.maximum(hi - 1, 0), G))
                k_s = tl.inline_asm_elementwise(_PREFETCH_ASM, "=r,l", [ks + gr * sks_g + (32 * (th % 4)) % (32 * NB)],
                                                dtype=tl.int32, is_pure=False, pack=1)
            else:
                k_s = start  # (nothing to carry)
            gr = _udiv(start + 16 * tl.arange(0, 4), G)
            k_m = tl.load(kb + gr[:, None] * skb_g + tl.arange(0, 8)[None, :], mask=(gr * G < hi)[:, None],
                          other=0.0)
        else:
            k_s, k_m = _key_meta(ks, km, ku, start, hi, d, dmask, sks_g, sku_g, 64, G, DQ, tl.float16)
        v_s, v_m = _value_meta_frag(vs, vm, vu, start, hi, svs_t, svu_g, w_, nl, kl, NS, G, DQ, MASKED)
        return k_s, k_m, v_s, v_m

    @triton.jit
    def _warps_tile_load(kp, ks, km, ku, vp, vs, vm, vu, start, hi, w_, nl, kl, k_off, k_tok, v_off, skp_t, sks_g,
                         sku_g, svp_r, svs_t, svu_g, d, dmask, NB: tl.constexpr, NJ: tl.constexpr, NS: tl.constexpr,
                         G: tl.constexpr, DQ: tl.constexpr, KEY_META_REGS: tl.constexpr, MASKED: tl.constexpr,
                         kb, skb_g, FOLD: tl.constexpr):
        """All of the warps kernel's loads for the 64-token tile at ``start``: the scales and minimums
        (:func:`_warps_meta_load`) and each thread's packed key and value words."""
        k_s, k_m, v_s, v_m = _warps_meta_load(ks, km, ku, vs, vm, vu, start, hi, w_, nl, kl, sks_g, sku_g, svs_t,
                                              svu_g, d, dmask, NB, NS, G, DQ, KEY_META_REGS, MASKED, kb, skb_g, FOLD)
        kw = tl.reshape(tl.join(_thread_words(kp + start * skp_t, k_off, (start + k_tok) < hi, NB, MASKED),
                                _thread_words(kp + (start + 8) * skp_t, k_off, (start + 8 + k_tok) < hi, NB,
                                              MASKED)), (128, NB, 2))
        vw = _thread_words(vp + _udiv(start, 4) * svp_r, v_off, (start + 16 * w_ + 4 * kl < hi)[:, None, None], NJ,
                           MASKED)
        return k_s, k_m, v_s, v_m, kw, vw

    @triton.jit
    def _softmax_step(s, m_i, l_i, start, hi, tok, MASKED: tl.constexpr, AXIS: tl.constexpr):
        """One tile's online-softmax step over the token axis ``AXIS`` of the scores ``s`` (``MASKED``: tokens
        ``start + tok`` past ``hi`` score -inf): ``(new running max, new running sum, the old sums' and
        outputs' rescale, p)``."""
        if MASKED:
            s = tl.where((start + tok) < hi, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=AXIS))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a warp with no token yet: nothing to scale
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - tl.expand_dims(m_use, AXIS))
        return m_new, l_i * alpha + tl.sum(p, axis=AXIS), alpha, p

    @triton.jit
    def _warps_tile(qb, kw, vw, k_s, k_m, v_s, v_m, m_i, l_i, acc, start, hi, tok, qk_scale, ks, ku, sks_g, sku_g,
                    D: tl.constexpr, NB: tl.constexpr, NJ: tl.constexpr, G: tl.constexpr, DQ: tl.constexpr,
                    KEY_META_REGS: tl.constexpr, ASM: tl.constexpr, MASKED: tl.constexpr, SWAP_PV: tl.constexpr,
                    SWAP_QK: tl.constexpr, MOVM: tl.constexpr, FOLD: tl.constexpr):
        """One 64-token tile of the warps kernel: each warp's 16 tokens dequantized into its dot operands, its
        scores, and its running maximum, sum and output updated (``MASKED``: tokens past ``hi`` score
        -inf). ``SWAP_QK``: the scores transposed, ``(4, 16 tokens, 8 heads)``, from K Q^T (``qb``: Q^T)."""
        # keys dequantized in the words' own shape, then K^T of each warp (4, D, 16), or K (4, 16, D)
        if KEY_META_REGS:
            c = _dequant_pairs(_word_pairs8(tl.reshape(kw, (4, 8, 4, NB, 2))), _key_frag(k_s, NB),
                               _key_frag(k_m, NB), ASM)  # (w, nl, kl, a, r, i1, i2, i0)
            if SWAP_QK:
                kt = tl.reshape(tl.permute(c, (0, 4, 1, 3, 6, 2, 5, 7)), (4, 16, D))
            else:
                kt = tl.reshape(tl.permute(c, (0, 3, 6, 2, 5, 7, 4, 1)), (4, D, 16))
        else:  # the tile's (token group, channel) scales broadcast to warp w's group (16 w) // G
            KG: tl.constexpr = 64 // G if G < 64 else 1
            # (the codes by inline PTX at head size 128: 513 -> 474 loop instructions with Triton 3.6, 627 -> 536
            # with 3.9; at 64 the Triton arithmetic compiles shorter: 386 against 397 since the shift-once unpack)
            if FOLD:  # raw codes (subnormals); this tile's scales into Q^T, the minimums as score offsets (k_m)
                c = _pair_subnormals(_word_pairs8(tl.reshape(kw, (4, 8, 4, NB, 2))), ASM)
                kt = tl.reshape(tl.permute(c, (0, 4, 1, 3, 6, 2, 5, 7)), (4, 16, D))
                qb = (qb * _ks_operand(ks, ku, start, hi, sks_g, sku_g, G, DQ, D, MASKED)).to(tl.float16)
            elif SWAP_QK:
                c = _pair_codes(_word_pairs8(tl.reshape(kw, (4, 8, 4, NB, 2))), ASM and D == 128)
                kt = tl.reshape(tl.permute(c, (0, 4, 1, 3, 6, 2, 5, 7)), (4, 16, D))
                kt = (kt * tl.reshape(tl.broadcast_to(tl.reshape(k_s, (KG, 1, 1, D)), (KG, 4 // KG, 16, D)),
                                      (4, 16, D))
                      + tl.reshape(tl.broadcast_to(tl.reshape(k_m, (KG, 1, 1, D)), (KG, 4 // KG, 16, D)), (4, 16, D)))
            else:
                c = _pair_codes(_word_pairs8(tl.reshape(kw, (4, 8, 4, NB, 2))), ASM and D == 128)
                kt = tl.reshape(tl.permute(c, (0, 3, 6, 2, 5, 7, 4, 1)), (4, D, 16))
                kt = (kt * tl.reshape(tl.broadcast_to(tl.reshape(k_s, (KG, 1, D, 1)), (KG, 4 // KG, D, 16)),
                                      (4, D, 16))
                      + tl.reshape(tl.broadcast_to(tl.reshape(k_m, (KG, 1, D, 1)), (KG, 4 // KG, D, 16)), (4, D, 16)))
        if SWAP_QK:  # s^T: (4, 16 tokens, 8 heads); the softmax runs down its columns
            if FOLD:  # 2^24 undoes the subnormals' scale; k_m: each warp's token group's offsets (4, 8)
                s = tl.dot(kt, qb) * (qk_scale * 16777216.0) + k_m[:, None, :] * qk_scale
            else:
                s = tl.dot(kt, qb) * qk_scale
            m_new, l_i, alpha, p = _softmax_step(s, m_i, l_i, start, hi, tok, MASKED, 1)
        else:
            m_new, l_i, alpha, p = _softmax_step(tl.dot(qb, kt) * qk_scale, m_i, l_i, start, hi, tok, MASKED, 2)
        # values dequantized in the words' own shape (w, nl, kl, j, i1, i2, i0), where the scales of token
        # 16 w + 4 kl + 2 i1 + i0 and group nl // NS meet them; then the operand (rows tokens, columns n)
        cv = _dequant_pairs(_word_pairs8(tl.reshape(vw, (4, 8, 4, NJ))), _value_frag(v_s, NJ),
                            _value_frag(v_m, NJ), ASM)  # (w, nl, kl, j, i1, i2, i0)
        if SWAP_QK:  # acc^T (4, D, 8) += V^T P^T, P^T from s^T's registers by a transpose of each 8 x 8 block
            vt = tl.reshape(tl.permute(cv, (0, 3, 5, 1, 2, 4, 6)), (4, D, 16))
            acc = acc * alpha[:, None, :] + tl.dot(vt, _scores_to_operand(p.to(tl.float16), MOVM))
        elif SWAP_PV:  # acc^T (4, D, 8) += V^T P^T: the first 8 query rows only
            vt = tl.reshape(tl.permute(cv, (0, 3, 5, 1, 2, 4, 6)), (4, D, 16))
            pt = _first8(tl.permute(p.to(tl.float16), (0, 2, 1)), 4, 16)  # (4, 16 tokens, 8 heads)
            acc = acc * _first8(tl.reshape(alpha, (4, 1, 16)), 4, 1) + tl.dot(vt, pt)
        else:
            v = tl.reshape(tl.permute(cv, (0, 2, 4, 6, 3, 5, 1)), (4, 16, D))
            acc = acc * alpha[:, :, None] + tl.dot(p.to(tl.float16), v)
        return m_new, l_i, acc

    # A transpose of the 8 x 8 fp16 matrix the 32 lanes of a warp hold a row pair each of (lane 4 g + t: row g,
    # columns 2 t, 2 t + 1), in one instruction; its result in the same registers.
    _MOVMATRIX_ASM = tl.constexpr("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;")

    @triton.jit
    def _scores_to_operand(p, MOVM: tl.constexpr):
        """P^T ``(4, 16 tokens, 8 heads)`` fp16 as the B operand of V^T P^T, from ``p``, the same matrix in
        the accumulator layout of K Q^T. The accumulator gives lane ``4 g + t`` tokens ``g, g + 8`` of heads
        ``2 t, 2 t + 1``; the operand wants tokens ``2 t, 2 t + 1, 2 t + 8, 2 t + 9`` of head ``g``: each 8 x 8
        block transposed across the lanes. Triton converts the layout itself through shared memory (a matrix
        store, a transposing matrix load, two barriers). ``MOVM``: one ``movmatrix`` a block moves the data in
        registers instead (Triton takes the asm for elementwise, so its result is relabelled, block by block
        transposed, at no cost; what is left is the shuffle conversion the operand needs in the 16-row
        variant too). The interpreter runs no PTX: there ``p`` goes as it is."""
        if MOVM:
            y = tl.inline_asm_elementwise(_MOVMATRIX_ASM, "=r,r", [p], dtype=tl.float16, is_pure=True, pack=2)
            return tl.reshape(tl.permute(tl.reshape(y, (4, 2, 8, 8)), (0, 1, 3, 2)), (4, 16, 8))
        else:
            return p

    @triton.jit
    def _first8(x, A: tl.constexpr, B: tl.constexpr):
        """The first 8 of the 16 entries along the last axis of an ``(A, B, 16)`` tensor."""
        lo, hi = tl.split(tl.permute(tl.reshape(x, (A, B, 2, 8)), (0, 1, 3, 2)))
        return lo

    @triton.jit
    def _kivi_decode_warps_kernel(
        Q, KP, KS, KM, VP, VS, VM, KU, VU, KR, VR, OA, OML,
        Tq, Tr, chunk_q, chunk_r, qk_scale, H_KV,
        sq_b, sq_h,
        skp_b, skp_h, skp_t, sks_b, sks_h, sks_g,
        svp_b, svp_h, svp_r, svs_b, svs_h, svs_t,
        sku_b, sku_h, sku_g, svu_b, svu_h, svu_g,
        skr_b, skr_h, skr_t, svr_b, svr_h, svr_t,
        soa_b, soa_h, soa_s, soml_b, soml_h, soml_s, KB, skb_b, skb_h, skb_g, svs_c,
        D: tl.constexpr, N_REP: tl.constexpr, BLOCK_H: tl.constexpr, G: tl.constexpr, DQ: tl.constexpr,
        KEY_META_REGS: tl.constexpr, ASM: tl.constexpr, META_AHEAD: tl.constexpr, SWAP_PV: tl.constexpr,
        SWAP_QK: tl.constexpr, MOVM: tl.constexpr, UNROLL2: tl.constexpr, FOLD: tl.constexpr,
    ):
        """4-bit keys in mma order and values in mma_w order (``kv_quant.to_mma_order``), 64-token tiles, 4
        warps, each warp on its own 16 tokens of every tile: a batched dot with the warps on the batch axis.
        Every warp keeps its own running maximum, sum and output, merged across warps once after the loop,
        so a tile needs no cross-warp reduction, and p goes from the scores' registers into the PV operand
        without a trip through shared memory. Code pairs are dequantized in the words' own shape (``ASM``:
        three f16x2 PTX instructions a pair). Whole tiles run unmasked, a partial last tile after the loop.
        The value scales are each thread's own (:func:`_value_meta_frag`); the key scales too with
        ``KEY_META_REGS`` (no barrier at all in the loop), else the tile's are spread through shared memory
        (4 barriers; faster on an H200). ``META_AHEAD``: the scales are fetched a tile ahead with the words.
        ``SWAP_PV`` (GQA groups of at most 8): P V as (V^T P^T)^T with 8 query rows. ``SWAP_QK`` (the same
        groups): the scores as K Q^T, 8 heads wide (``MOVM``: P^T transposed by movmatrix). ``FOLD`` (with
        ``SWAP_QK``, not ``KEY_META_REGS``): the keys' codes enter the dot raw, as fp16 subnormals (code x
        2^-24, one AND a pair), each tile's key scales multiply Q^T (loaded at the tile; ``FOLD`` = 2: the
        lines prefetched into L1 a tile ahead by PTX, 1: not, in the interpreter) and the minimums come as
        each token group's score offset ``KB`` = minimums . q (``key_score_offsets``). Knobs and timings: the
        ``WARPS_*`` module variables, gpu/NOTES.md."""
        NB: tl.constexpr = D // 32
        NJ: tl.constexpr = D // 16  # value words a thread a tile
        NG: tl.constexpr = D // G if G < D else 1  # value groups in a row
        split = tl.program_id(1)
        b, hk, heads, hmask, d, dmask, q, m_0, l_0, acc_0 = _program_start(Q, sq_b, sq_h, H_KV, N_REP, BLOCK_H, D,
                                                                            D, tl.float16)
        if SWAP_QK:  # Q^T of the first 8 heads: (4, D, 8)
            qb = _qt_operand(Q, b * sq_b, sq_h, hk, N_REP, D)
        else:
            qb = tl.broadcast_to(q[None, :, :], (4, BLOCK_H, D))
        lo = split * chunk_q
        hi = tl.minimum(lo + chunk_q, Tq)
        kp, ks, km, vp, vs, vm, ku, vu = _cache_pointers(KP, KS, KM, VP, VS, VM, KU, VU, b, hk, skp_b, skp_h, sks_b,
                                                         sks_h, svp_b, svp_h, svs_b, svs_h, sku_b, sku_h, svu_b, svu_h)
        kbp = KB + b * skb_b + hk * skb_h
        NS: tl.constexpr = 8 // NG  # operand column groups (nl) a value group spans
        th_ = tl.arange(0, 128)
        vs = vs + ((th_ // 4) % 8 // NS) * svs_c  # each thread's value group's column of scales and minimums
        vm = vm + ((th_ // 4) % 8 // NS) * svs_c
        if FOLD:  # the codes at bits 4-7 of a byte enter as 16 x code x 2^-24: their channels' queries / 16
            dq_ = tl.arange(0, D)[None, :, None]
            qb = (qb * tl.where((dq_ // 2) % 2 == 1, 0.0625, 1.0)).to(tl.float16)
        # thread 32 w + 4 nl + kl: key words as in the mma kernel (warp w's K^T columns nl + 8 r are tokens
        # 16 w + 8 r + nl); value words (row 4 (slice) + kl, word nl NJ + j) hold its 4 tokens x D / 8 channels
        th = tl.arange(0, 128)
        w_ = th // 32
        nl = (th // 4) % 8
        kl = th % 4
        kb = tl.arange(0, NB if NB < 4 else 4)
        # (a thread's key words of its two columns r: loaded apart and joined, so that r is a register axis
        # by construction; one 3D load let Triton 3.9 spread r over lanes)
        k_tok = (nl + 16 * w_)[:, None, None]
        k_off = k_tok * skp_t + (kl[:, None, None] * NB + kb[None, :, None])
        v_off = ((4 * w_ + kl)[:, None] * svp_r + (nl * NJ)[:, None] + tl.arange(0, 4)[None, :])[:, :, None]
        n = tl.arange(0, D)
        chan = D // 8 * (n % 8) + 2 * (n // 16) + (n // 8) % 2  # channel of acc column n
        if SWAP_QK:  # token of score (w, n, :)
            tok = 16 * tl.arange(0, 4)[:, None, None] + tl.arange(0, 16)[None, :, None]
            m_i = tl.full((4, 8), float("-inf"), tl.float32)
            l_i = tl.zeros((4, 8), tl.float32)
        else:  # token of score (w, :, n)
            tok = 16 * tl.arange(0, 4)[:, None, None] + tl.arange(0, 16)[None, None, :]
            m_i = tl.full((4, BLOCK_H), float("-inf"), tl.float32)
            l_i = tl.zeros((4, BLOCK_H), tl.float32)
        if SWAP_PV or SWAP_QK:
            acc = tl.zeros((4, D, 8), tl.float32)
        else:
            acc = tl.zeros((4, BLOCK_H, D), tl.float32)
        # whole tiles in the loop, with no mask at all (the last one's prefetch reads that tile again rather
        # than past the end); a partial last tile after it, masked
        hi_full = lo + (hi - lo) // 64 * 64
        last = tl.maximum(hi_full - 64, lo)
        if UNROLL2:  # two buffers, each reloaded right after its tile: no register copies a tile
            ks_a, km_a, vs_a, vm_a, kw_a, vw_a = _warps_tile_load(
                kp, ks, km, ku, vp, vs, vm, vu, lo, hi, w_, nl, kl, k_off, k_tok, v_off, skp_t, sks_g, sku_g, svp_r,
                svs_t, svu_g, d, dmask, NB, NJ, NS, G, DQ, KEY_META_REGS, True, kbp, skb_g, FOLD)
            ks_b, km_b, vs_b, vm_b, kw_b, vw_b = _warps_tile_load(
                kp, ks, km, ku, vp, vs, vm, vu, tl.minimum(lo + 64, last), hi, w_, nl, kl, k_off, k_tok, v_off,
                skp_t, sks_g, sku_g, svp_r, svs_t, svu_g, d, dmask, NB, NJ, NS, G, DQ, KEY_META_REGS, True, kbp,
                skb_g, FOLD)
            n_full = (hi_full - lo) // 64
            for start in range(lo, lo + n_full // 2 * 128, 128):
                m_i, l_i, acc = _warps_tile(
                    qb, kw_a, vw_a, ks_a, km_a, vs_a, vm_a, m_i, l_i, acc, start, hi, tok, qk_scale, ks, ku, sks_g,
                    sku_g, D, NB, NJ, G, DQ, KEY_META_REGS, ASM, False, SWAP_PV, SWAP_QK, MOVM, FOLD)
                ks_a, km_a, vs_a, vm_a, kw_a, vw_a = _warps_tile_load(
                    kp, ks, km, ku, vp, vs, vm, vu, tl.minimum(start + 128, last), hi, w_, nl, kl, k_off, k_tok,
                    v_off, skp_t, sks_g, sku_g, svp_r, svs_t, svu_g, d, dmask, NB, NJ, NS, G, DQ, KEY_META_REGS,
                    False, kbp, skb_g, FOLD)
                m_i, l_i, acc = _warps_tile(
                    qb, kw_b, vw_b, ks_b, km_b, vs_b, vm_b, m_i, l_i, acc, start + 64, hi, tok, qk_scale, ks, ku,
                    sks_g, sku_g, D, NB, NJ, G, DQ, KEY_META_REGS, ASM, False, SWAP_PV, SWAP_QK, MOVM, FOLD)
                ks_b, km_b, vs_b, vm_b, kw_b, vw_b = _warps_tile_load(
                    kp, ks, km, ku, vp, vs, vm, vu, tl.minimum(start + 192, last), hi, w_, nl, kl, k_off, k_tok,
                    v_off, skp_t, sks_g, sku_g, svp_r, svs_t, svu_g, d, dmask, NB, NJ, NS, G, DQ, KEY_META_REGS,
                    False, kbp, skb_g, FOLD)
            if n_full % 2:  # an odd whole tile: buffer a holds it
                m_i, l_i, acc = _warps_tile(
                    qb, kw_a, vw_a, ks_a, km_a, vs_a, vm_a, m_i, l_i, acc, hi_full - 64, hi, tok, qk_scale, ks, ku,
                    sks_g, sku_g, D, NB, NJ, G, DQ, KEY_META_REGS, ASM, False, SWAP_PV, SWAP_QK, MOVM, FOLD)
        else:
            k_s_nx, k_m_nx, v_s_nx, v_m_nx, kw_nx, vw_nx = _warps_tile_load(
                kp, ks, km, ku, vp, vs, vm, vu, lo, hi, w_, nl, kl, k_off, k_tok, v_off, skp_t, sks_g, sku_g, svp_r,
                svs_t, svu_g, d, dmask, NB, NJ, NS, G, DQ, KEY_META_REGS, True, kbp, skb_g, FOLD)
            for start in range(lo, hi_full, 64):
                k_s, k_m, v_s, v_m, kw, vw = k_s_nx, k_m_nx, v_s_nx, v_m_nx, kw_nx, vw_nx
                if not META_AHEAD:  # this tile's scales now (the prefetched ones are then never loaded)
                    k_s, k_m, v_s, v_m = _warps_meta_load(
                        ks, km, ku, vs, vm, vu, start, hi, w_, nl, kl, sks_g, sku_g, svs_t, svu_g, d, dmask, NB, NS,
                        G, DQ, KEY_META_REGS, False, kbp, skb_g, FOLD)
                k_s_nx, k_m_nx, v_s_nx, v_m_nx, kw_nx, vw_nx = _warps_tile_load(
                    kp, ks, km, ku, vp, vs, vm, vu, tl.minimum(start + 64, last), hi, w_, nl, kl, k_off, k_tok, v_off,
                    skp_t, sks_g, sku_g, svp_r, svs_t, svu_g, d, dmask, NB, NJ, NS, G, DQ, KEY_META_REGS, False, kbp,
                    skb_g, FOLD)
                m_i, l_i, acc = _warps_tile(
                    qb, kw, vw, k_s, k_m, v_s, v_m, m_i, l_i, acc, start, hi, tok, qk_scale, ks, ku, sks_g, sku_g, D,
                    NB, NJ, G, DQ, KEY_META_REGS, ASM, False, SWAP_PV, SWAP_QK, MOVM, FOLD)
        if hi_full < hi:
            k_s, k_m, v_s, v_m, kw, vw = _warps_tile_load(
                kp, ks, km, ku, vp, vs, vm, vu, hi_full, hi, w_, nl, kl, k_off, k_tok, v_off, skp_t, sks_g, sku_g,
                svp_r, svs_t, svu_g, d, dmask, NB, NJ, NS, G, DQ, KEY_META_REGS, True, kbp, skb_g, FOLD)
            m_i, l_i, acc = _warps_tile(
                qb, kw, vw, k_s, k_m, v_s, v_m, m_i, l_i, acc, hi_full, hi, tok, qk_scale, ks, ku, sks_g, sku_g, D,
                NB, NJ, G, DQ, KEY_META_REGS, ASM, True, SWAP_PV, SWAP_QK, MOVM, FOLD)

        if SWAP_QK:  # the states of heads 8.. (none): -inf and 0
            m_i = tl.reshape(tl.permute(tl.join(m_i, tl.full((4, 8), float("-inf"), tl.float32)), (0, 2, 1)),
                             (4, BLOCK_H))
            l_i = tl.reshape(tl.permute(tl.join(l_i, tl.zeros((4, 8), tl.float32)), (0, 2, 1)), (4, BLOCK_H))
        if SWAP_PV or SWAP_QK:  # back to (4, BLOCK_H, D), query rows 8.. zero
            acc = tl.permute(acc, (0, 2, 1))
            acc = tl.reshape(tl.permute(tl.join(acc, tl.zeros_like(acc)), (0, 3, 1, 2)), (4, BLOCK_H, D))
        # the warps' states merged: one cross-warp reduction a program
        m_w = tl.max(m_i, axis=0)
        sc = tl.exp2(m_i - tl.where(m_w == float("-inf"), 0.0, m_w)[None, :])
        l_w = tl.sum(l_i * sc, axis=0)
        acc_w = tl.sum(acc * sc[:, :, None], axis=0)
        m_w, l_w, acc_w = _attend_full(q, m_w, l_w, acc_w, KR + b * skr_b + hk * skr_h, VR + b * svr_b + hk * svr_h,
                                       split * chunk_r, tl.minimum(split * chunk_r + chunk_r, Tr), skr_t, svr_t,
                                       qk_scale, d, dmask, chan, 64, tl.float16, "tf32")
        _store_partial(OA, OML, acc_w, m_w, l_w, b, heads, hmask, split, chan, dmask, soa_b, soa_h, soa_s, soml_b,
                       soml_h, soml_s)

    @triton.jit
    def _kivi_decode_kernel(
        Q, KP, KS, KM, VP, VS, VM, KU, VU, KR, VR, OA, OML,
        Tq, Tr, chunk_q, chunk_r, qk_scale, H_KV,
        sq_b, sq_h,
        skp_b, skp_h, skp_w, sks_b, sks_h, sks_g,
        svp_b, svp_h, svp_t, svs_b, svs_h, svs_t,
        sku_b, sku_h, sku_g, svu_b, svu_h, svu_g,
        skr_b, skr_h, skr_t, svr_b, svr_h, svr_t,
        soa_b, soa_h, soa_s, soml_b, soml_h, soml_s,
        D: tl.constexpr, BLOCK_D: tl.constexpr, N_REP: tl.constexpr, BLOCK_H: tl.constexpr,
        BITS_K: tl.constexpr, BITS_V: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr,
        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, DQ: tl.constexpr, UNPACK: tl.constexpr,
        DEQ_DTYPE: tl.constexpr, PREFETCH: tl.constexpr,
    ):
        # UNPACK 0: one gather per element; 1: each packed word and scale loaded once and spread in registers
        PWK: tl.constexpr = 32 // BITS_K
        PWV: tl.constexpr = 32 // BITS_V
        MASK_K: tl.constexpr = (1 << BITS_K) - 1
        MASK_V: tl.constexpr = (1 << BITS_V) - 1
        split = tl.program_id(1)
        b, hk, heads, hmask, d, dmask, q, m_i, l_i, acc = _program_start(Q, sq_b, sq_h, H_KV, N_REP, BLOCK_H, D,
                                                                          BLOCK_D, DOT_DTYPE)

        # ---- quantized tokens of this split
        lo = split * chunk_q
        hi = tl.minimum(lo + chunk_q, Tq)
        kp, ks, km, vp, vs, vm, ku, vu = _cache_pointers(KP, KS, KM, VP, VS, VM, KU, VU, b, hk, skp_b, skp_h, sks_b,
                                                         sks_h, svp_b, svp_h, svs_b, svs_h, sku_b, sku_h, svu_b, svu_h)
        if UNPACK == 2:
            if PREFETCH:
                k_s_nx, k_m_nx = _key_meta(ks, km, ku, lo, hi, d, dmask, sks_g, sku_g, BLOCK_T, G, DQ, DEQ_DTYPE)
                v_s_nx, v_m_nx = _value_meta(vs, vm, vu, lo, hi, svs_t, svu_g, BLOCK_T, BLOCK_D, D, G, DQ, DEQ_DTYPE)
            if PREFETCH == 2:
                kw_nx = _key_words(kp, lo, hi, d, dmask, skp_w, PWK, BLOCK_T)
                vw_nx = _value_words(vp, lo, hi, svp_t, PWV, BLOCK_T, BLOCK_D, D)
        for start in range(lo, hi, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            tmask = t < hi
            m2 = tmask[:, None] & dmask[None, :]
            if UNPACK == 2:
                # each packed word is loaded once and split into its codes in the loading thread; scales and
                # minimums are applied per word (one per PWK tokens of a channel) before the codes fan out
                if PREFETCH:  # this tile's metadata came with the last tile; ask for the next tile's now
                    k_s, k_m, v_s, v_m = k_s_nx, k_m_nx, v_s_nx, v_m_nx
                    k_s_nx, k_m_nx = _key_meta(ks, km, ku, start + BLOCK_T, hi, d, dmask, sks_g, sku_g, BLOCK_T, G, DQ,
                                               DEQ_DTYPE)
                    v_s_nx, v_m_nx = _value_meta(vs, vm, vu, start + BLOCK_T, hi, svs_t, svu_g, BLOCK_T, BLOCK_D, D, G,
                                                 DQ, DEQ_DTYPE)
                else:
                    k_s, k_m = _key_meta(ks, km, ku, start, hi, d, dmask, sks_g, sku_g, BLOCK_T, G, DQ, DEQ_DTYPE)
                    v_s, v_m = _value_meta(vs, vm, vu, start, hi, svs_t, svu_g, BLOCK_T, BLOCK_D, D, G, DQ, DEQ_DTYPE)
                NW2: tl.constexpr = BLOCK_T // PWK
                if PREFETCH == 2:  # the packed words too, in registers (no shared-memory staging)
                    kw, vw = kw_nx, vw_nx
                    kw_nx = _key_words(kp, start + BLOCK_T, hi, d, dmask, skp_w, PWK, BLOCK_T)
                    vw_nx = _value_words(vp, start + BLOCK_T, hi, svp_t, PWV, BLOCK_T, BLOCK_D, D)
                else:
                    kw = _key_words(kp, start, hi, d, dmask, skp_w, PWK, BLOCK_T)
                k3 = (_unpack_f16(kw, BITS_K, NW2, BLOCK_D).to(DEQ_DTYPE) * _per_row(k_s, NW2, BLOCK_D)[:, :, None]
                      + _per_row(k_m, NW2, BLOCK_D)[:, :, None])
                # built as K^T (channels x tokens, a thread's tokens contiguous) for the dot below
                kt = tl.reshape(tl.permute(k3, (1, 0, 2)), (BLOCK_D, BLOCK_T))
            elif UNPACK == 1:
                # each packed word and each scale/minimum is loaded once and spread over its tokens or
                # channels in registers (tiles start on word and group boundaries: BLOCK_T and G are
                # powers of two, and Tq and every split's range are multiples of both)
                NW: tl.constexpr = BLOCK_T // PWK
                NG: tl.constexpr = BLOCK_T // G if BLOCK_T >= G else 1
                GT: tl.constexpr = G if BLOCK_T >= G else BLOCK_T
                w = start // PWK + tl.arange(0, NW)
                wm = (w * PWK < hi)[:, None] & dmask[None, :]
                kw = tl.load(kp + w[:, None] * skp_w + d[None, :], mask=wm, other=0)
                kc = (kw[:, None, :] >> (tl.arange(0, PWK) * BITS_K)[None, :, None]) & MASK_K
                kc = tl.reshape(kc, (BLOCK_T, BLOCK_D)).to(tl.float32)
                gr = start // G + tl.arange(0, NG)
                gm = (gr * G < hi)[:, None] & dmask[None, :]
                goff = gr[:, None] * sks_g + d[None, :]
                k_s = tl.load(ks + goff, mask=gm, other=0).to(tl.float32)
                k_m = tl.load(km + goff, mask=gm, other=0).to(tl.float32)
                if DQ:
                    up = ku + gr * sku_g
                    gv = gr * G < hi
                    k_s = k_s * tl.load(up, mask=gv, other=0.0).to(tl.float32)[:, None]
                    k_m = (tl.load(up + 1, mask=gv, other=0.0).to(tl.float32)[:, None]
                           + k_m * tl.load(up + 2, mask=gv, other=0.0).to(tl.float32)[:, None])
                k_s = tl.reshape(tl.broadcast_to(k_s[:, None, :], (NG, GT, BLOCK_D)), (BLOCK_T, BLOCK_D))
                k_m = tl.reshape(tl.broadcast_to(k_m[:, None, :], (NG, GT, BLOCK_D)), (BLOCK_T, BLOCK_D))
                k = kc * k_s + k_m
            else:
                # keys: word row t // PWK, code at bit (t % PWK) * BITS_K; scale/min of group t // G, channel d
                kw = tl.load(kp + (t // PWK)[:, None] * skp_w + d[None, :], mask=m2, other=0)
                kc = ((kw >> ((t % PWK) * BITS_K)[:, None]) & MASK_K).to(tl.float32)
                goff = (t // G)[:, None] * sks_g + d[None, :]
                k_s = tl.load(ks + goff, mask=m2, other=0).to(tl.float32)
                k_m = tl.load(km + goff, mask=m2, other=0).to(tl.float32)
                if DQ:  # 8-bit codes against the super-block of token group t // G
                    up = ku + (t // G) * sku_g
                    k_s = k_s * tl.load(up, mask=tmask, other=0.0).to(tl.float32)[:, None]
                    k_m = (tl.load(up + 1, mask=tmask, other=0.0).to(tl.float32)[:, None]
                           + k_m * tl.load(up + 2, mask=tmask, other=0.0).to(tl.float32)[:, None])
                k = kc * k_s + k_m
            if UNPACK == 2:
                s = tl.dot(q, kt.to(DOT_DTYPE), input_precision=PRECISION) * qk_scale
            else:
                s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * qk_scale
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if UNPACK == 2:
                # values: word c of token t holds channels c * PWV .. c * PWV + PWV - 1, all in group c * PWV // G
                NC2: tl.constexpr = BLOCK_D // PWV
                if PREFETCH != 2:
                    vw = _value_words(vp, start, hi, svp_t, PWV, BLOCK_T, BLOCK_D, D)
                v3 = (_unpack_f16(vw, BITS_V, BLOCK_T, NC2).to(DEQ_DTYPE) * _per_col(v_s, BLOCK_T, NC2)[:, :, None]
                      + _per_col(v_m, BLOCK_T, NC2)[:, :, None])
                v = tl.reshape(v3, (BLOCK_T, BLOCK_D))
            elif UNPACK == 1:
                NC: tl.constexpr = BLOCK_D // PWV
                NGD: tl.constexpr = BLOCK_D // G
                c = tl.arange(0, NC)
                vw = tl.load(vp + t[:, None] * svp_t + c[None, :], mask=tmask[:, None] & (c * PWV < D)[None, :],
                             other=0)
                vc = (vw[:, :, None] >> (tl.arange(0, PWV) * BITS_V)[None, None, :]) & MASK_V
                vc = tl.reshape(vc, (BLOCK_T, BLOCK_D)).to(tl.float32)
                gc = tl.arange(0, NGD)
                voff = t[:, None] * svs_t + gc[None, :]
                vmask = tmask[:, None] & (gc * G < D)[None, :]
                v_s = tl.load(vs + voff, mask=vmask, other=0).to(tl.float32)
                v_m = tl.load(vm + voff, mask=vmask, other=0).to(tl.float32)
            else:
                # values: word column d // PWV of token t, code at bit (d % PWV) * BITS_V; scale/min of group d // G
                vw = tl.load(vp + t[:, None] * svp_t + (d // PWV)[None, :], mask=m2, other=0)
                vc = ((vw >> ((d % PWV) * BITS_V)[None, :]) & MASK_V).to(tl.float32)
                voff = t[:, None] * svs_t + (d // G)[None, :]
                v_s = tl.load(vs + voff, mask=m2, other=0).to(tl.float32)
                v_m = tl.load(vm + voff, mask=m2, other=0).to(tl.float32)
            if UNPACK != 2:
                if DQ:
                    up = vu + (t // G) * svu_g
                    v_s = v_s * tl.load(up, mask=tmask, other=0.0).to(tl.float32)[:, None]
                    v_m = (tl.load(up + 1, mask=tmask, other=0.0).to(tl.float32)[:, None]
                           + v_m * tl.load(up + 2, mask=tmask, other=0.0).to(tl.float32)[:, None])
                if UNPACK == 1:
                    v_s = tl.reshape(tl.broadcast_to(v_s[:, :, None], (BLOCK_T, NGD, G)), (BLOCK_T, BLOCK_D))
                    v_m = tl.reshape(tl.broadcast_to(v_m[:, :, None], (BLOCK_T, NGD, G)), (BLOCK_T, BLOCK_D))
                v = vc * v_s + v_m
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
            m_i = m_new

        # ---- full-precision recent tokens of this split
        m_i, l_i, acc = _attend_full(q, m_i, l_i, acc, KR + b * skr_b + hk * skr_h, VR + b * svr_b + hk * svr_h,
                                     split * chunk_r, tl.minimum(split * chunk_r + chunk_r, Tr), skr_t, svr_t,
                                     qk_scale, d, dmask, d, BLOCK_T, DOT_DTYPE, PRECISION)
        _store_partial(OA, OML, acc, m_i, l_i, b, heads, hmask, split, d, dmask, soa_b, soa_h, soa_s, soml_b,
                       soml_h, soml_s)


    @triton.jit
    def _key_offsets_kernel(KM, KU, Q, OUT, NGR, H_KV, skm_b, skm_h, skm_g, sku_b, sku_h, sku_g, sq_b, sq_h,
                            so_b, so_h, so_g, D: tl.constexpr, N_REP: tl.constexpr, DQ: tl.constexpr,
                            BLOCK: tl.constexpr):
        """The folded keys' score offsets: for ``BLOCK`` token groups of one (sequence, kv head), each group's
        key minimums . each query head's q, float32 ``(groups, 8)`` (heads past ``N_REP`` get 0). Reads the
        minimums once, as the decode kernel would have."""
        pid = tl.program_id(0)
        b = pid // H_KV
        hk = pid % H_KV
        gr = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        gmask = gr < NGR
        d = tl.arange(0, D)
        m = tl.load(KM + b * skm_b + hk * skm_h + gr[:, None] * skm_g + d[None, :], mask=gmask[:, None], other=0)
        if DQ:  # 8-bit codes against their group's (minimum base, minimum step)
            up = KU + b * sku_b + hk * sku_h + gr * sku_g
            m = (tl.load(up + 1, mask=gmask, other=0.0).to(tl.float32)[:, None]
                 + m.to(tl.float32) * tl.load(up + 2, mask=gmask, other=0.0).to(tl.float32)[:, None])
        h = tl.arange(0, 16)
        q = tl.load(Q + b * sq_b + (hk * N_REP + h)[:, None] * sq_h + d[None, :], mask=(h < N_REP)[:, None],
                    other=0.0)
        if DQ:  # (BLOCK, 16): fp32 products in full precision
            out = tl.dot(m, tl.trans(q.to(tl.float32)), input_precision="ieee")
        else:  # fp16 products are exact, summed in fp32
            out = tl.dot(m, tl.trans(q))
        o = OUT + b * so_b + hk * so_h + gr[:, None] * so_g + h[None, :]
        tl.store(o, out, mask=gmask[:, None] & (h < 8)[None, :])

    @triton.jit
    def _subnormal_dot_probe_kernel(A, B, C):
        """One 16 x 16 x 16 fp16 dot (a tensor-core instruction on a GPU), fp32 out."""
        r = tl.arange(0, 16)
        a = tl.load(A + r[:, None] * 16 + r[None, :])
        b = tl.load(B + r[:, None] * 16 + r[None, :])
        tl.store(C + r[:, None] * 16 + r[None, :], tl.dot(a, b))

    @triton.jit
    def _merge_splits_kernel(OA, OML, OUT, S, soa_r, soa_s, soml_r, soml_s, so_r,
                             D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, CH: tl.constexpr):
        """Combine the per-split partial softmax results of one (sequence, query head) row."""
        r = tl.program_id(0)
        sp = tl.arange(0, BLOCK_S)
        m_all = tl.load(OML + r * soml_r + sp * soml_s, mask=sp < S, other=float("-inf"))
        mmax = tl.max(m_all, axis=0)
        d = tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_D], tl.float32)
        den = tl.zeros([CH], tl.float32)
        for s0 in range(0, S, CH):
            sc = s0 + tl.arange(0, CH)
            smask = sc < S
            m = tl.load(OML + r * soml_r + sc * soml_s, mask=smask, other=float("-inf"))
            l_ = tl.load(OML + r * soml_r + sc * soml_s + 1, mask=smask, other=0.0)
            w = tl.where(m > float("-inf"), tl.exp2(m - mmax), 0.0)  # empty splits weigh 0
            a = tl.load(OA + r * soa_r + sc[:, None] * soa_s + d[None, :], mask=smask[:, None] & (d < D)[None, :],
                        other=0.0)
            acc += tl.sum(a * w[:, None], axis=0)
            den += l_ * w
        out = acc / tl.sum(den, axis=0)
        tl.store(OUT + r * so_r + d, out.to(OUT.dtype.element_ty), mask=d < D)


@functools.cache
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(dev: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132 stands in for the interpreter's CPU tensors)."""
    return _sm_count_of(dev.index if dev.index is not None else torch.cuda.current_device()) if dev.type == "cuda" else 132


_SUBNORMAL_DOT: dict = {}


def key_score_offsets(kq: QuantizedTensor, q: torch.Tensor) -> torch.Tensor:
    """The folded keys' score offsets (WARPS_FOLD_KEYS): for each token group of the quantized keys and each
    query head of its GQA group, the group's (effective) key minimums . the head's query, float32 ``(B, Hkv,
    Tq / G, 8)`` (heads past the group's size 0). ``q``: ``(B, Hq, D)`` fp16."""
    b, hq, d = q.shape
    h_kv, ngr = kq.shape[1], kq.minimum.shape[2]
    dq = kq.sup is not None
    out = torch.empty(b, h_kv, ngr, 8, dtype=torch.float32, device=q.device)
    kmu = kq.sup if dq else kq.minimum
    _key_offsets_kernel[(b * h_kv, cdiv(ngr, 16))](
        kq.minimum, kmu, q, out, ngr, h_kv, *kq.minimum.stride()[:3], *kmu.stride()[:3], *q.stride()[:2],
        *out.stride()[:3], D=d, N_REP=hq // h_kv, DQ=dq, BLOCK=16)
    return out


def subnormal_dot_ok(dev: torch.device) -> bool:
    """Whether Triton's fp16 dot on ``dev`` multiplies fp16 subnormals exactly (WARPS_FOLD_KEYS feeds the
    keys' codes to the tensor cores as subnormals): one probe dot a device, its answer kept. The codes as
    they would arrive (code x 2^-24 and 16 code x 2^-24) against random normal values, checked against the
    float64 product."""
    key = (dev.type, dev.index)
    ok = _SUBNORMAL_DOT.get(key)
    if ok is None:
        g = torch.Generator().manual_seed(7)
        codes = torch.randint(0, 16, (16, 16), generator=g, dtype=torch.int16)
        codes[:, 8:] <<= 4  # the codes at bits 4-7 of a byte
        b = (torch.rand(16, 16, generator=g) * 2 - 1).half()
        out = torch.empty(16, 16, dtype=torch.float32, device=dev)
        try:
            _subnormal_dot_probe_kernel[(1,)](codes.view(torch.float16).to(dev), b.to(dev), out, num_warps=1)
            want = codes.double() * 2.0 ** -24 @ b.double()
            ok = bool(torch.allclose(out.cpu().double(), want, rtol=1e-5, atol=2.0 ** -40))
        except Exception:  # no answer: assume not
            ok = False
        _SUBNORMAL_DOT[key] = ok
    return ok


# The last Triton launch of kivi_decode_attention: which kernel, its split count and (on a GPU) how many of its
# programs an SM holds; benches read it to record what ran
LAST_LAUNCH: dict = {}
_PROGRAMS_PER_SM: dict = {}


def _programs_per_sm(kernel, consts: dict, dtypes: tuple, make_args, dev: torch.device) -> int:
    """How many programs of ``kernel`` (as compiled for these constants and tensor ``dtypes``) one SM of
    ``dev`` holds at once: the fewest that its registers, shared memory and threads allow. The first time,
    compiles the kernel for the arguments ``make_args()`` returns (the launch then finds it in Triton's
    cache); 4 if the compiled kernel's resources cannot be read. Later calls are a dictionary lookup."""
    key = (kernel.__name__, dev.index, tuple(sorted(consts.items())), dtypes)
    n = _PROGRAMS_PER_SM.get(key)
    if n is None:
        try:
            k = kernel.warmup(*make_args(), grid=(1, 1), **consts)
            k._init_handles()
            props = torch.cuda.get_device_properties(dev)
            n = occupancy(k.n_regs, k.metadata.shared, k.metadata.num_warps,
                          getattr(props, "regs_per_multiprocessor", 65536),
                          getattr(props, "shared_memory_per_multiprocessor", 233472),
                          props.max_threads_per_multi_processor)
        except Exception:  # an older or newer Triton without these attributes: the former assumption
            n = 4
        _PROGRAMS_PER_SM[key] = n
    return n


def occupancy(n_regs: int, shared: int, num_warps: int, regs_per_sm: int = 65536, smem_per_sm: int = 233472,
              max_threads: int = 2048) -> int:
    """Programs of ``num_warps`` warps an SM holds at once with ``n_regs`` registers a thread (allocated by
    eights) and ``shared`` bytes of shared memory (plus the 1 KB the driver reserves a block): the fewest
    that registers, shared memory and threads allow (1 to 32). Defaults: an H100's or H200's SM."""
    threads = num_warps * 32
    by_regs = regs_per_sm // (threads * ((max(n_regs, 1) + 7) // 8 * 8))
    by_smem = smem_per_sm // (shared + 1024) if shared else 32
    return max(1, min(by_regs, by_smem, max_threads // threads, 32))


def wave_splits(heads: int, tokens: int, slots: int, most: int, block_t: int = 64, overhead: int = 128) -> int:
    """The split count (1 to ``most``) for ``heads`` (sequences x kv heads) programs a split over ``tokens``
    tokens when ``slots`` programs run at once on the GPU: the fewest whole waves, each as short as it can be.
    A latency-bound kernel runs a wave of resident programs in about the time of one program, so the time
    is modelled as waves x (tokens a split + ``overhead``, a program's fixed cost in tokens); ties go to
    fewer splits. E.g. 256 programs a split over 16K tokens: 3 splits with 396 slots (768 programs, 1.94
    waves), 1 with 264.

    It runs on every decode call, so it does not try every split count: within the split counts that make
    ``w`` waves the cost falls with the tokens a split, so only the most splits of each wave count can win,
    or the fewest that give the same tile count; and no wave count can win once ``w`` x ``overhead`` alone
    exceeds the best cost (the tokens are shared out over the waves). ``tests/test_gpu_kernels.py`` checks
    it against the cost of every split count."""
    if most <= 1 or heads <= 0:
        return 1
    tiles = cdiv(tokens, block_t)
    best = None
    w = cdiv(heads, slots)  # the waves of one split
    while True:
        hi = min(most, w * slots // heads)  # the most splits that still run in w waves
        per = cdiv(tiles, hi)  # tiles a split there; the fewest splits with as few tiles a split:
        cand = (w * (per * block_t + overhead), cdiv(tiles, per))
        # (that count may run in fewer waves; then the fewer waves' own candidate costs less and wins)
        if best is None or cand < best:
            best = cand
        if hi == most:
            break
        w += 1
        if tiles * block_t * heads // slots + w * overhead >= best[0]:
            break  # (a lower bound of any later wave count's cost)
    return best[1]


def _decode_triton(q, kq, vq, k_res, v_res, scale, num_splits, block_t, num_warps, unpack, num_stages, q_regs,
                   prefetch):
    b, hq, d = q.shape
    dev = q.device
    if kq is not None:
        h_kv = kq.shape[1]
        tq = kq.shape[2]
        bits_k, bits_v, g = kq.bits, vq.bits, kq.group_size
        kp, ks, km, vp, vs, vm = kq.packed, kq.scale, kq.minimum, vq.packed, vq.scale, vq.minimum
        dq = kq.sup is not None
        ku, vu = (kq.sup, vq.sup) if dq else (ks, vs)
    else:
        h_kv = k_res.shape[1]
        tq, bits_k, bits_v, g = 0, 4, 4, 32
        z = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=dev)
        zf = torch.zeros(1, 1, 1, 1, dtype=torch.float16, device=dev)
        kp, ks, km, vp, vs, vm = z, zf, zf, z, zf, zf
        ku, vu, dq = zf, zf, False
    if k_res is None or k_res.shape[-2] == 0:
        tr = 0
        k_res = v_res = torch.zeros(b, h_kv, 1, d, dtype=q.dtype, device=dev)
    else:
        tr = k_res.shape[-2]
    if k_res.stride(-1) != 1 or v_res.stride(-1) != 1:
        k_res, v_res = k_res.contiguous(), v_res.contiguous()
    q = q.contiguous()
    n_rep = hq // h_kv
    if kq is not None and kq.order == "mma" and (block_t not in (64, 128) or g < block_t // 4 or vq.order == "mma_w"):
        block_t = 64  # the mma kernels' tiles: 64 or 128 tokens (128 needs groups of at least 32; mma_w: 64)
    block_d = max(16, next_pow2(d))
    fold = bool(kq is not None and vq.order == "mma_w" and WARPS_FOLD_KEYS and WARPS_SWAP_QK and n_rep <= 8
                and d == 128 and not WARPS_KEY_META_IN_REGISTERS and subnormal_dot_ok(dev))
    if fold:  # each key token group's score offset per query head: minimums . q, (B, Hkv, Tq / G, 8) float32
        kbias = key_score_offsets(kq, q)
    else:
        kbias = torch.zeros(1, 1, 1, 1, dtype=torch.float32, device=dev)
    if kq is not None and vq.order == "mma_w":
        kernel, consts = _kivi_decode_warps_kernel, dict(
            D=d, N_REP=n_rep, BLOCK_H=16, G=g, DQ=dq, KEY_META_REGS=WARPS_KEY_META_IN_REGISTERS,
            ASM=WARPS_ASM and not INTERPRET_AT_IMPORT, META_AHEAD=WARPS_META_AHEAD,
            SWAP_PV=WARPS_SWAP_PV and n_rep <= 8, SWAP_QK=WARPS_SWAP_QK and n_rep <= 8 and d == 128,
            MOVM=WARPS_MOVMATRIX and not INTERPRET_AT_IMPORT, UNROLL2=WARPS_UNROLL2 and WARPS_META_AHEAD,
            FOLD=(1 if INTERPRET_AT_IMPORT else 2) if fold else 0,
            **({"maxnreg": WARPS_MAXNREG} if WARPS_MAXNREG and not INTERPRET_AT_IMPORT else {}),
            num_warps=4, num_stages=WARPS_NUM_STAGES)
    elif kq is not None and kq.order == "mma":
        chunk_hint = cdiv(tq, num_splits or max(1, 4 * _sm_count(dev) // max(1, b * h_kv)))
        kernel, consts = _kivi_decode_mma_kernel, dict(
            D=d, N_REP=n_rep, BLOCK_H=max(16, next_pow2(n_rep)), G=g, DQ=dq, BLOCK_T=block_t, BITS=bits_k,
            Q_REGS=n_rep <= 16 and (q_regs if q_regs is not None else bits_k == 4 and chunk_hint >= 32 * block_t),
            num_warps=4, num_stages=1)
    else:
        mode = UNPACK_MODES[unpack]
        if mode >= 1 and block_t < 32 // min(bits_k, bits_v):  # a tile must hold whole packed words
            mode = 0
        # the dots' operand type: the queries' for fp16 and bf16, else fp32 with fp32 products (the default for
        # fp32 dots on a GPU is tf32, ~1e-3 relative). Triton's interpreter multiplies the bit patterns of bf16
        # operands (triton-lang/triton#11584; bf16 dots are unsupported there): it gets fp32 dots of the same
        # values. (Decided on torch dtypes: comparing Triton's costs microseconds a call on the host.)
        half = q.dtype == torch.float16 or (q.dtype == torch.bfloat16 and not INTERPRET_AT_IMPORT)
        dot_dtype = (tl.float16 if q.dtype == torch.float16 else tl.bfloat16) if half else tl.float32
        kernel, consts = _kivi_decode_kernel, dict(
            D=d, BLOCK_D=block_d, N_REP=n_rep, BLOCK_H=max(16, next_pow2(n_rep)),
            BITS_K=bits_k, BITS_V=bits_v, G=g, BLOCK_T=block_t, DOT_DTYPE=dot_dtype,
            PRECISION="tf32" if half else "ieee", DQ=dq, UNPACK=mode,
            DEQ_DTYPE=tl.float16 if q.dtype == torch.float16 else tl.float32,
            PREFETCH=PREFETCH_MODES[prefetch], num_warps=num_warps,
            # (fp32 tiles are twice as large: without software pipelining they fit in shared memory at any block_t;
            # with unpack="join" and prefetch="all" the packed words wait in registers: no pipeline needed)
            num_stages=num_stages if num_stages is not None else (
                1 if not half or (mode == 2 and prefetch == "all") else 2))

    def launch_args(splits):
        # every split starts on a tile boundary (and, with unpack="expand", on a packed word's and a group's);
        # the partials' split axis is padded to a multiple of 8 so that their strides, and with them the
        # compiled kernel's specialization, do not depend on the split count
        chunk_q = cdiv(cdiv(tq, splits), block_t) * block_t if tq else 0
        chunk_r = cdiv(cdiv(tr, splits), block_t) * block_t if tr else 0
        oa = torch.empty(b, hq, cdiv(splits, 8) * 8, d, dtype=torch.float32, device=dev)
        oml = torch.empty(b, hq, cdiv(splits, 8) * 8, 2, dtype=torch.float32, device=dev)
        # both kernels take the same tensors and strides (the packed words' third stride: key word rows or
        # tokens, value tokens or word rows, as the order has them)
        args = (q, kp, ks, km, vp, vs, vm, ku, vu, k_res, v_res, oa, oml,
                tq, tr, chunk_q, chunk_r, scale * 1.4426950408889634, h_kv,
                *q.stride()[:2], *kp.stride()[:3], *ks.stride()[:3], *vp.stride()[:3], *vs.stride()[:3],
                *ku.stride()[:3], *vu.stride()[:3], *k_res.stride()[:3], *v_res.stride()[:3],
                *oa.stride()[:3], *oml.stride()[:3])
        if kernel is _kivi_decode_warps_kernel:  # (its keys' score offsets)
            args += (kbias, *kbias.stride()[:3], vs.stride(3))
        return oa, oml, args

    programs_per_sm = None
    if num_splits is None:
        most = cdiv(tq + tr, 256)  # each split at least 256 tokens
        if dev.type == "cuda":  # whole waves of the programs an SM holds at once
            programs_per_sm = _programs_per_sm(kernel, consts, (q.dtype, ks.dtype, ku.dtype, k_res.dtype, v_res.dtype),
                                               lambda: launch_args(1)[2], dev)
            num_splits = wave_splits(b * h_kv, tq + tr, programs_per_sm * _sm_count(dev), most, block_t)
        else:  # (the interpreter: about four programs an SM, as for the GPU's ~120-register kernels)
            num_splits = max(1, min(max(1, 4 * _sm_count(dev) // max(1, b * h_kv)), most))
    oa, oml, args = launch_args(num_splits)
    kernel[(b * h_kv, num_splits)](*args, **consts)
    LAST_LAUNCH.clear()
    LAST_LAUNCH.update(kernel=getattr(kernel, "__name__", type(kernel).__name__), num_splits=num_splits,
                       programs_per_sm=programs_per_sm, fold_keys=fold)
    out = torch.empty(b, hq, d, dtype=q.dtype, device=dev)
    _merge_splits_kernel[(b * hq,)](
        oa, oml, out, num_splits, oa.stride(1), oa.stride(2), oml.stride(1), oml.stride(2), out.stride(1),
        D=d, BLOCK_D=block_d, BLOCK_S=next_pow2(num_splits), CH=16,
    )
    return out


def mma_kernel_takes(key_bits: int, value_bits: int, head_dim: int, group_size: int) -> bool:
    """Whether :func:`_kivi_decode_mma_kernel` takes a cache of this shape (with fp16 queries): keys and
    values both 4-bit or both 2-bit, a head size of 32 to 256 that is a power of two (64 or more at 2 bits),
    and a group size of at least 16 and at least a quarter of the head size. Otherwise a cache in mma
    order is re-packed in KIVI order for the general kernel."""
    return (key_bits == value_bits and key_bits in (4, 2)
            and head_dim in ((32, 64, 128, 256) if key_bits == 4 else (64, 128, 256))
            and group_size >= max(16, head_dim // 4))


# Knobs of the warps kernel (decode_attention's module variables; gpu_bench.py times them, "mma_w" rows). Those
# marked "timed" were the fastest on an H200 (2026-11-27, B 32 x 16K tokens, 4-bit: 315 us, 50.6% of the copy
# bandwidth; benches/RESULTS.md has every row). Those marked "untimed" were chosen offline afterwards, on the
# instruction and register counts of an sm_90 compile (gpu/NOTES.md, fifth and sixth sessions): they pass every
# interpreter test and compile for sm_90, but no GPU has run them yet.
# Timed:
# the key scales: each thread loads those of its own codes (True: no barrier in the loop, but 8 lanes load
# the same values: 348 us), or the tile's are fetched once and spread through shared memory (False: 4
# barriers a tile)
WARPS_KEY_META_IN_REGISTERS = False
# code pairs dequantized with inline PTX (three f16x2 instructions a pair); False: the same arithmetic in
# Triton operations (8% slower)
WARPS_ASM = True
# the scales and minimums: fetched a tile ahead, with the words (True), or at the start of their own tile
# (False: ~65-95 loop instructions of loop-carried state fewer, but their latency exposed: 454 against 348 us)
WARPS_META_AHEAD = True
# a register cap (ptxas's), e.g. 168 for three programs an SM instead of two or 128 for four (spills)
WARPS_MAXNREG = None
# P V as (V^T P^T)^T with 8 query rows (GQA groups of at most 8): half the output accumulator and half the
# P V tensor-core instructions of the 16-row product
WARPS_SWAP_PV = True
# Untimed (on: WARPS_SWAP_QK, WARPS_FOLD_KEYS; off until timed: the rest):
# the scores as K Q^T, (16 tokens, 8 heads) a warp (GQA groups of at most 8, head size 128): half the tensor-core
# instructions, exponentials and query registers of the 16-row Q K^T; P^T then passes through shared memory on
# its way to P V (each 8 x 8 block transposed). Offline sm_90 compile (Triton 3.6): 450 -> 428 loop
# instructions, 198 -> 168 registers (three programs an SM instead of two). Untimed: chosen on that count
WARPS_SWAP_QK = True
# with WARPS_SWAP_QK: the transposes by movmatrix, in registers (433 instructions, no barrier added), instead
WARPS_MOVMATRIX = False
# the loop unrolled by two with two buffers of prefetched words and scales, each refilled right after its tile
# is done: no register copies of the prefetched tile a tile (with the scales a tile ahead). Offline (3.6): 787
# loop instructions for two tiles (393 a tile, against 428) but 232 registers (two programs an SM, not three;
# a 168 cap spills). Untimed
WARPS_UNROLL2 = False
# with WARPS_SWAP_QK and the key scales through shared memory: the keys' codes enter the dot as fp16 subnormals
# (one AND a pair, no offset and no scaling), their scales are folded into Q^T each tile, their minimums added
# as a score offset per token group (key_score_offsets, a small kernel launched first). Relies on the tensor cores
# multiplying fp16 subnormals exactly: a probe dot checks that once a device (subnormal_dot_ok), and without it
# the keys are dequantized as before. Offline sm_90 compile: 428 -> 382 loop instructions at 168 registers
# (Triton 3.6), 426 at 183 -> 385 at 167 (3.9). Untimed: the default on that count
WARPS_FOLD_KEYS = True
# Triton's software pipeline depth for the warps kernel (its own prefetch keeps the next tile in registers
# either way). At 2 or 3, Triton moves 8 of the loop's 10 64-bit loads to cp.async copies into shared memory,
# 1 or 2 tiles further ahead: offline (3.6) 351 -> 376 / 388 loop instructions, still 168 registers. For the
# latency-bound loop of the Nsight reading (65% of cycles with no eligible warp), more bytes in flight without
# more registers. Untimed: stays 1 until the bench has a row for it
WARPS_NUM_STAGES = 1


def warps_kernel_takes(key_bits: int, value_bits: int, head_dim: int, group_size: int, n_rep: int,
                       meta_bits: int = 16) -> bool:
    """Whether :func:`_kivi_decode_warps_kernel` (a warp per 16 tokens of a tile; keys in mma order, values
    in mma_w order) takes a cache of this shape with fp16 queries: 4-bit keys and values with 16-bit scales,
    head size 64 or 128, groups of at least 16 tokens and D / 8 channels, and at most 16 query heads a kv
    head. (With 8-bit scales the kernel passes in the interpreter but gave wrong results on an H200 on
    2026-11-27, for every knob setting, asm off too; such caches go to the other kernels until that is
    found: gpu/NOTES.md.)"""
    return (key_bits == value_bits == 4 and head_dim in (64, 128) and group_size >= max(16, head_dim // 8)
            and n_rep <= 16 and meta_bits == 16)


def _mma_kernel_fits(q, kq, vq) -> bool:
    if vq.order == "mma_w":
        return q.dtype == torch.float16 and kq.order == "mma" and warps_kernel_takes(
            kq.bits, vq.bits, q.shape[-1], kq.group_size, q.shape[1] // kq.shape[1], kq.meta_bits)
    return q.dtype == torch.float16 and mma_kernel_takes(kq.bits, vq.bits, q.shape[-1], kq.group_size)


def _check_decode_inputs(q, kq, vq, k_res, v_res) -> None:
    """Shapes, dtypes and devices that agree, or a ``ValueError`` / ``TypeError`` naming what does not (the
    kernels trust them: a wrong batch or head count would read past the cache)."""
    if q.dim() != 3:
        raise ValueError(f"q must be (B, Hq, D) or (B, Hq, 1, D), got shape {tuple(q.shape)}")
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    if (k_res is None) != (v_res is None):
        raise ValueError("k_res and v_res must both be given or both be None")
    if k_res is not None:
        if k_res.dim() != 4 or k_res.shape != v_res.shape:
            raise ValueError(f"k_res and v_res must be (B, Hkv, Tr, D) of one shape, got {tuple(k_res.shape)} "
                             f"and {tuple(v_res.shape)}")
        if not (k_res.is_floating_point() and v_res.is_floating_point()):
            raise TypeError(f"k_res and v_res must be floating-point, got {k_res.dtype} and {v_res.dtype}")
    if (kq is None) != (vq is None) or (kq is not None and tuple(kq.shape) != tuple(vq.shape)):
        raise ValueError("quantized keys and values must cover the same tokens "
                         f"(shapes {None if kq is None else tuple(kq.shape)} and {None if vq is None else tuple(vq.shape)})")
    if kq is None and (k_res is None or k_res.shape[-2] == 0):
        raise ValueError("empty cache")
    b, hq, d = q.shape  # (each QuantizedTensor was checked when it was made)
    for name, shape in (("quantized keys", None if kq is None else tuple(kq.shape)),
                        ("k_res", None if k_res is None else tuple(k_res.shape))):
        if shape is None:
            continue
        if shape[0] != b or shape[3] != d:
            raise ValueError(f"q is (B={b}, Hq={hq}, D={d}) but {name} are (B, Hkv, T, D) = {shape}")
        if shape[1] == 0 or hq % shape[1]:
            raise ValueError(f"the query heads ({hq}) must be a multiple of the kv heads ({shape[1]})")
    if kq is not None and k_res is not None and tuple(kq.shape[:2]) != tuple(k_res.shape[:2]):
        raise ValueError(f"the quantized keys {tuple(kq.shape)} and k_res {tuple(k_res.shape)} differ in B or Hkv")
    dev = q.device
    for t in (k_res, v_res) + ((None, None) if kq is None else (kq.packed, vq.packed)):  # (the rest: one device each)
        if t is not None and t.device != dev:
            raise ValueError(f"q is on {dev} but the cache is on {t.device}")


def kivi_decode_attention(q: torch.Tensor, kq: Optional[QuantizedTensor], vq: Optional[QuantizedTensor],
                          k_res: Optional[torch.Tensor], v_res: Optional[torch.Tensor], *,
                          sm_scale: Optional[float] = None, num_splits: Optional[int] = None,
                          block_t: int = 64, num_warps: int = 4, unpack: str = "join",
                          num_stages: Optional[int] = None, prefetch: str = "all",
                          q_in_registers: Optional[bool] = None, backend: str = "auto") -> torch.Tensor:
    """Attention of one query token per sequence over a KIVI cache.

    ``q``: ``(B, Hq, D)`` or ``(B, Hq, 1, D)``; ``kq``/``vq``: quantized keys and values over the same
    ``Tq`` oldest tokens (or ``None``); ``k_res``/``v_res``: ``(B, Hkv, Tr, D)`` recent tokens in full
    precision (or ``None``). ``Hq`` must be a multiple of ``Hkv`` (grouped-query attention). Returns
    ``(B, Hq, D)`` (or ``(B, Hq, 1, D)``) in ``q``'s dtype. No mask: every cached token is attended to.
    Tuning knobs of the Triton kernel: ``num_splits`` (sequence slices; default on a GPU: whole waves of
    as many programs as an SM holds of the compiled kernel, :func:`wave_splits`), ``block_t`` (tokens per
    tile, a power of two), ``num_warps``, ``num_stages`` (Triton's shared-memory pipeline depth; default 1
    with ``unpack="join", prefetch="all"`` or fp32 caches, else 2);
    ``unpack``: ``"join"`` (each packed word split into fp16 codes in the thread that loaded it, no
    int-to-float conversions), ``"expand"`` (the codes spread through a reshape) or ``"gather"`` (one
    load per element); ``prefetch``: what the next tile fetches while this one is computed:
    ``"all"`` (packed words, scales and minimums, in registers), ``"meta"`` (scales and minimums) or
    ``"none"``; it applies to ``unpack="join"`` (the other two fetch each tile with it). Measured on an
    H100 (benches/RESULTS.md): the defaults run 1.38x faster than ``unpack="expand", prefetch="none"`` on a
    32 x 16K-token 4-bit cache.

    A cache in tensor-core operand order (:func:`kv_quant.to_mma_order`) with fp16 queries goes to a
    kernel of its own (64- or 128-token ``block_t``; ``unpack``, ``prefetch``, ``num_warps`` and
    ``num_stages`` do not apply). ``q_in_registers`` (up to 16 query heads per kv head) loads the queries
    straight into their mma fragments, where they stay for the whole loop, instead of reading them back
    from shared memory for every tile. It costs registers and a longer start, so it pays only over long
    loops: the default (``None``) turns it on for 4-bit keys when each program covers at least 32 tiles.
    On an H100 it made B 32 x 16K tokens (128 tiles a program) 1.11x faster at 4 bits (450-458 against
    501-503 us) and 1.03x slower at 2 bits; at B 1 x 32K tokens (8 tiles a program) the kernel alone took
    1.7-2x longer with it.

    Keys in mma order with values in mma_w order (``kv_quant.to_mma_order(values, warps=True)``; 4-bit, head
    size 64 or 128, 16-bit scales) go to a third kernel, which gives each warp its own 16 tokens of every
    64-token tile and merges the warps once at the end; its knobs are the ``WARPS_*`` module variables.
    On an H200, with the knobs timed on 2026-11-27, it ran B 32 x 16K tokens in 315 us against 442 us for the
    mma kernel and 688 us for the KIVI-order one (benches/RESULTS.md). ``QuantizedKVCache(operand_order=True)``
    stores that order where this kernel takes it.
    """
    if unpack not in UNPACK_MODES:
        raise ValueError(f"unpack must be one of {tuple(UNPACK_MODES)}, got {unpack!r}")
    if prefetch not in PREFETCH_MODES:
        raise ValueError(f"prefetch must be one of {tuple(PREFETCH_MODES)}, got {prefetch!r}")
    if block_t < 16 or block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two of at least 16, got {block_t}")
    squeeze = q.dim() == 4
    if squeeze:
        if q.shape[2] != 1:
            raise ValueError("decode attention takes one query token per sequence")
        q = q[:, :, 0]
    _check_decode_inputs(q, kq, vq, k_res, v_res)
    if kq is not None and kq.group_size != vq.group_size:
        raise ValueError("keys and values must share one group size")
    if kq is not None and kq.meta_bits != vq.meta_bits:
        raise ValueError("keys and values must share one metadata format (meta_bits)")
    if kq is not None and kq.order != vq.order and (kq.order, vq.order) != ("mma", "mma_w"):
        raise ValueError("quantized keys and values must share one packing order (or: keys mma, values mma_w)")
    if kq is not None and kq.order == "mma" and not _mma_kernel_fits(q, kq, vq):
        kq, vq = from_mma_order(kq), from_mma_order(vq)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if pick_backend(backend, q) == "triton":
        out = _decode_triton(q, kq, vq, k_res, v_res, scale, num_splits, block_t, num_warps, unpack, num_stages,
                             q_in_registers, prefetch)
    else:
        out = kivi_decode_attention_ref(q, kq, vq, k_res, v_res, scale)
    return out[:, :, None] if squeeze else out

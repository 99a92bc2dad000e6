"""Fused decode attention over a KIVI cache: packed quantized tokens plus a full-precision window.

One query token per sequence attends to ``Tq`` quantized tokens (keys packed per channel, values per
token, see :mod:`kv_quant`) followed by ``Tr`` full-precision recent tokens. The Triton kernel unpacks
and dequantizes each key and value tile in registers right before its dot product, so the
full-precision cache is never written out. Work is split along the sequence (flash-decoding): each
program handles one kv head (all query heads of its GQA group at once, so each packed word is read
once) and one slice of tokens, keeps an online softmax, and writes a partial result; a small torch
step merges the slices.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._triton import HAS_TRITON, next_pow2, pick_backend, tl, triton
from .kv_quant import QuantizedTensor, dequantize

__all__ = ["kivi_decode_attention", "kivi_decode_attention_ref"]

UNPACK_MODES = {"gather": 0, "expand": 1}


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
    ):
        # UNPACK 0: one gather per element; 1: each packed word and scale loaded once and spread in registers
        PWK: tl.constexpr = 32 // BITS_K
        PWV: tl.constexpr = 32 // BITS_V
        MASK_K: tl.constexpr = (1 << BITS_K) - 1
        MASK_V: tl.constexpr = (1 << BITS_V) - 1
        pid = tl.program_id(0)
        split = tl.program_id(1)
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

        # ---- quantized tokens of this split
        lo = split * chunk_q
        hi = tl.minimum(lo + chunk_q, Tq)
        kp = KP + b * skp_b + hk * skp_h
        ks = KS + b * sks_b + hk * sks_h
        km = KM + b * sks_b + hk * sks_h
        vp = VP + b * svp_b + hk * svp_h
        vs = VS + b * svs_b + hk * svs_h
        vm = VM + b * svs_b + hk * svs_h
        ku = KU + b * sku_b + hk * sku_h
        vu = VU + b * svu_b + hk * svu_h
        for start in range(lo, hi, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            tmask = t < hi
            m2 = tmask[:, None] & dmask[None, :]
            if UNPACK == 1:
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
            s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * qk_scale
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if UNPACK != 0:
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
            if DQ:
                up = vu + (t // G) * svu_g
                v_s = v_s * tl.load(up, mask=tmask, other=0.0).to(tl.float32)[:, None]
                v_m = (tl.load(up + 1, mask=tmask, other=0.0).to(tl.float32)[:, None]
                       + v_m * tl.load(up + 2, mask=tmask, other=0.0).to(tl.float32)[:, None])
            if UNPACK != 0:
                v_s = tl.reshape(tl.broadcast_to(v_s[:, :, None], (BLOCK_T, NGD, G)), (BLOCK_T, BLOCK_D))
                v_m = tl.reshape(tl.broadcast_to(v_m[:, :, None], (BLOCK_T, NGD, G)), (BLOCK_T, BLOCK_D))
            v = vc * v_s + v_m
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION)
            m_i = m_new

        # ---- full-precision recent tokens of this split
        lo = split * chunk_r
        hi = tl.minimum(lo + chunk_r, Tr)
        kr = KR + b * skr_b + hk * skr_h
        vr = VR + b * svr_b + hk * svr_h
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
            v = tl.load(vr + t[:, None] * svr_t + d[None, :], mask=m2, other=0.0).to(DOT_DTYPE)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
            m_i = m_new

        tl.store(OA + b * soa_b + heads[:, None] * soa_h + split * soa_s + d[None, :], acc,
                 mask=hmask[:, None] & dmask[None, :])
        tl.store(OML + b * soml_b + heads * soml_h + split * soml_s, m_i, mask=hmask)
        tl.store(OML + b * soml_b + heads * soml_h + split * soml_s + 1, l_i, mask=hmask)


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


def _decode_triton(q, kq, vq, k_res, v_res, scale, num_splits, block_t, num_warps, unpack):
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
    if num_splits is None:
        # enough programs to fill a GPU (~4 per SM on 132 SMs), each at least 256 tokens
        target = max(1, 512 // max(1, b * h_kv))
        num_splits = max(1, min(target, triton.cdiv(tq + tr, 256)))
    mode = UNPACK_MODES[unpack]
    if mode == 1 and block_t < 32 // min(bits_k, bits_v):  # a tile must hold whole packed words
        mode = 0
    # every split starts on a tile boundary (and, with unpack="expand", on a packed word's and a group's)
    chunk_q = triton.cdiv(triton.cdiv(tq, num_splits), block_t) * block_t if tq else 0
    chunk_r = triton.cdiv(triton.cdiv(tr, num_splits), block_t) * block_t if tr else 0
    oa = torch.empty(b, hq, num_splits, d, dtype=torch.float32, device=dev)
    oml = torch.empty(b, hq, num_splits, 2, dtype=torch.float32, device=dev)
    dot_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(q.dtype, tl.float32)
    # fp32 caches get fp32 products (the default for fp32 dots on a GPU is tf32, ~1e-3 relative)
    precision = "ieee" if dot_dtype == tl.float32 else "tf32"
    block_d = max(16, next_pow2(d))
    grid = (b * h_kv, num_splits)
    _kivi_decode_kernel[grid](
        q, kp, ks, km, vp, vs, vm, ku, vu, k_res, v_res, oa, oml,
        tq, tr, chunk_q, chunk_r, scale * 1.4426950408889634, h_kv,
        q.stride(0), q.stride(1),
        kp.stride(0), kp.stride(1), kp.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        vp.stride(0), vp.stride(1), vp.stride(2), vs.stride(0), vs.stride(1), vs.stride(2),
        ku.stride(0), ku.stride(1), ku.stride(2), vu.stride(0), vu.stride(1), vu.stride(2),
        k_res.stride(0), k_res.stride(1), k_res.stride(2), v_res.stride(0), v_res.stride(1), v_res.stride(2),
        oa.stride(0), oa.stride(1), oa.stride(2), oml.stride(0), oml.stride(1), oml.stride(2),
        D=d, BLOCK_D=block_d, N_REP=n_rep, BLOCK_H=max(16, next_pow2(n_rep)),
        BITS_K=bits_k, BITS_V=bits_v, G=g, BLOCK_T=block_t, DOT_DTYPE=dot_dtype, PRECISION=precision,
        DQ=dq, UNPACK=mode, num_warps=num_warps,
        # fp32 tiles are twice as large: without software pipelining they fit in shared memory at any block_t
        **({"num_stages": 1} if dot_dtype == tl.float32 else {}),
    )
    out = torch.empty(b, hq, d, dtype=q.dtype, device=dev)
    _merge_splits_kernel[(b * hq,)](
        oa, oml, out, num_splits, oa.stride(1), oa.stride(2), oml.stride(1), oml.stride(2), out.stride(1),
        D=d, BLOCK_D=block_d, BLOCK_S=next_pow2(num_splits), CH=16,
    )
    return out


def kivi_decode_attention(q: torch.Tensor, kq: Optional[QuantizedTensor], vq: Optional[QuantizedTensor],
                          k_res: Optional[torch.Tensor], v_res: Optional[torch.Tensor], *,
                          sm_scale: Optional[float] = None, num_splits: Optional[int] = None,
                          block_t: int = 64, num_warps: int = 4, unpack: str = "expand",
                          backend: str = "auto") -> torch.Tensor:
    """Attention of one query token per sequence over a KIVI cache.

    ``q``: ``(B, Hq, D)`` or ``(B, Hq, 1, D)``; ``kq``/``vq``: quantized keys and values over the same
    ``Tq`` oldest tokens (or ``None``); ``k_res``/``v_res``: ``(B, Hkv, Tr, D)`` recent tokens in full
    precision (or ``None``). ``Hq`` must be a multiple of ``Hkv`` (grouped-query attention). Returns
    ``(B, Hq, D)`` (or ``(B, Hq, 1, D)``) in ``q``'s dtype. No mask: every cached token is attended to.
    Tuning knobs of the Triton kernel: ``num_splits`` (sequence slices; default fills the GPU),
    ``block_t`` (tokens per tile, a power of two), ``num_warps``, and ``unpack``: ``"expand"`` (each
    packed word and scale loaded once and spread in registers; 1.5x to 6x faster on an H200) or
    ``"gather"`` (one load per element).
    """
    if unpack not in UNPACK_MODES:
        raise ValueError(f"unpack must be one of {tuple(UNPACK_MODES)}, got {unpack!r}")
    if block_t < 16 or block_t & (block_t - 1):
        raise ValueError(f"block_t must be a power of two of at least 16, got {block_t}")
    squeeze = q.dim() == 4
    if squeeze:
        if q.shape[2] != 1:
            raise ValueError("decode attention takes one query token per sequence")
        q = q[:, :, 0]
    if kq is None and (k_res is None or k_res.shape[-2] == 0):
        raise ValueError("empty cache")
    if (kq is None) != (vq is None) or (kq is not None and kq.shape[2] != vq.shape[2]):
        raise ValueError("quantized keys and values must cover the same tokens")
    if kq is not None and kq.group_size != vq.group_size:
        raise ValueError("keys and values must share one group size")
    if kq is not None and kq.meta_bits != vq.meta_bits:
        raise ValueError("keys and values must share one metadata format (meta_bits)")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if pick_backend(backend, q) == "triton":
        out = _decode_triton(q, kq, vq, k_res, v_res, scale, num_splits, block_t, num_warps, unpack)
    else:
        out = kivi_decode_attention_ref(q, kq, vq, k_res, v_res, scale)
    return out[:, :, None] if squeeze else out

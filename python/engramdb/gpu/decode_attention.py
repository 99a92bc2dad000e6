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
        DOT_DTYPE: tl.constexpr, DQ: tl.constexpr,
    ):
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
            s = tl.dot(q, tl.trans(k.to(DOT_DTYPE))) * qk_scale
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
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
            v = vc * v_s + v_m
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE))
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
            s = tl.dot(q, tl.trans(k)) * qk_scale
            s = tl.where(tmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(vr + t[:, None] * svr_t + d[None, :], mask=m2, other=0.0).to(DOT_DTYPE)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v)
            m_i = m_new

        tl.store(OA + b * soa_b + heads[:, None] * soa_h + split * soa_s + d[None, :], acc,
                 mask=hmask[:, None] & dmask[None, :])
        tl.store(OML + b * soml_b + heads * soml_h + split * soml_s, m_i, mask=hmask)
        tl.store(OML + b * soml_b + heads * soml_h + split * soml_s + 1, l_i, mask=hmask)


def _decode_triton(q, kq, vq, k_res, v_res, scale, num_splits, block_t):
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
    chunk_q = triton.cdiv(triton.cdiv(tq, num_splits), block_t) * block_t if tq else 0
    chunk_r = triton.cdiv(triton.cdiv(tr, num_splits), block_t) * block_t if tr else 0
    oa = torch.empty(b, hq, num_splits, d, dtype=torch.float32, device=dev)
    oml = torch.empty(b, hq, num_splits, 2, dtype=torch.float32, device=dev)
    dot_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(q.dtype, tl.float32)
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
        D=d, BLOCK_D=max(16, next_pow2(d)), N_REP=n_rep, BLOCK_H=max(16, next_pow2(n_rep)),
        BITS_K=bits_k, BITS_V=bits_v, G=g, BLOCK_T=block_t, DOT_DTYPE=dot_dtype,
        DQ=dq,
    )
    m = oml[..., 0]
    l_ = oml[..., 1]
    mmax = m.amax(-1, keepdim=True)
    w = torch.exp2(m - mmax)  # empty splits carry m = -inf and weigh 0
    out = (oa * w[..., None]).sum(-2) / (l_ * w).sum(-1)[..., None]
    return out.to(q.dtype)


def kivi_decode_attention(q: torch.Tensor, kq: Optional[QuantizedTensor], vq: Optional[QuantizedTensor],
                          k_res: Optional[torch.Tensor], v_res: Optional[torch.Tensor], *,
                          sm_scale: Optional[float] = None, num_splits: Optional[int] = None,
                          block_t: int = 32, backend: str = "auto") -> torch.Tensor:
    """Attention of one query token per sequence over a KIVI cache.

    ``q``: ``(B, Hq, D)`` or ``(B, Hq, 1, D)``; ``kq``/``vq``: quantized keys and values over the same
    ``Tq`` oldest tokens (or ``None``); ``k_res``/``v_res``: ``(B, Hkv, Tr, D)`` recent tokens in full
    precision (or ``None``). ``Hq`` must be a multiple of ``Hkv`` (grouped-query attention). Returns
    ``(B, Hq, D)`` (or ``(B, Hq, 1, D)``) in ``q``'s dtype. No mask: every cached token is attended to.
    """
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
        out = _decode_triton(q, kq, vq, k_res, v_res, scale, num_splits, block_t)
    else:
        out = kivi_decode_attention_ref(q, kq, vq, k_res, v_res, scale)
    return out[:, :, None] if squeeze else out

"""KIVI-style asymmetric quantization of a KV cache, with codes packed into int32 words.

KIVI (Liu et al., ICML 2024) quantizes keys per channel (each channel's statistics over a group
of ``G`` consecutive tokens) and values per token (each token's statistics over ``G`` consecutive
channels). Both cases are "group along one axis, pack along the same axis", so one kernel serves
both, given strides.

Layouts (``B`` batch, ``H`` kv heads, ``T`` quantized tokens, ``D`` head size,
``PW = 32 // bits`` codes per int32 word; code ``j`` of a word sits at bits ``[j*bits, (j+1)*bits)``):

=========  =======================  ======================  =========================
tensor     keys (per channel)       values (per token)      dtype
=========  =======================  ======================  =========================
packed     ``(B, H, T // PW, D)``   ``(B, H, T, D // PW)``  int32
scale      ``(B, H, T // G, D)``    ``(B, H, T, D // G)``   ``meta_dtype`` (fp16)
minimum    ``(B, H, T // G, D)``    ``(B, H, T, D // G)``   ``meta_dtype`` (fp16)
=========  =======================  ======================  =========================

``x ≈ code * scale + minimum``. The stored minimum is rounded down and the scale up before they
are cast to ``meta_dtype`` and the codes are computed from the rounded values, so every element
dequantizes to within half a step (``scale / 2``) of its input, up to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._triton import HAS_TRITON, pick_backend, tl, triton

__all__ = [
    "QuantizedTensor",
    "quantize_keys",
    "quantize_values",
    "dequantize",
    "quantize_grouped_ref",
]


@dataclass
class QuantizedTensor:
    """A packed KIVI tensor; ``axis`` is ``"token"`` for keys and ``"channel"`` for values."""

    packed: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    bits: int
    group_size: int
    axis: str
    shape: tuple  # (B, H, T, D) of the dequantized tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.minimum))


def _check(bits: int, group_size: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    per_word = 32 // bits
    if group_size % per_word or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two and a multiple of {per_word}, got {group_size}")
    return per_word


# --------------------------------------------------------------------------- torch reference
def quantize_grouped_ref(x: torch.Tensor, bits: int, group_size: int, meta_dtype=torch.float16):
    """Quantize the last axis of ``x`` in groups; returns ``(codes uint8, scale, minimum)``.

    ``codes`` has ``x``'s shape; ``scale`` and ``minimum`` have the last axis divided by the group size.
    """
    qmax = (1 << bits) - 1
    *lead, c = x.shape
    xg = x.float().reshape(*lead, c // group_size, group_size)
    mn = xg.amin(-1)
    mx = xg.amax(-1)
    mn_r = (mn - mn.abs() * 2.0**-10).to(meta_dtype)
    scale_r = ((mx - mn_r.float()) / qmax * (1.0 + 2.0**-10)).to(meta_dtype)
    mnf = mn_r.float()[..., None]
    sf = scale_r.float()[..., None]
    inv = torch.where(sf > 0, 1.0 / torch.where(sf > 0, sf, torch.ones_like(sf)), torch.zeros_like(sf))
    q = torch.floor((xg - mnf) * inv + 0.5).clamp_(0, qmax)
    return q.to(torch.uint8).reshape(*lead, c), scale_r, mn_r


def _pack_last_ref(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per_word = 32 // bits
    *lead, c = codes.shape
    cw = codes.to(torch.int64).reshape(*lead, c // per_word, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64, device=codes.device) * bits
    words = (cw << shifts).sum(-1)  # disjoint bit fields: the sum is their OR, in [0, 2**32)
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)  # reinterpret as int32


def _unpack_last_ref(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32, device=packed.device) * bits
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_word)


def _quantize_ref(x, bits, group_size, axis, meta_dtype):
    if axis == "token":  # keys: group and pack along T -> work on (B, H, D, T)
        codes, scale, mn = quantize_grouped_ref(x.transpose(-1, -2), bits, group_size, meta_dtype)
        packed = _pack_last_ref(codes, bits).transpose(-1, -2).contiguous()
        return packed, scale.transpose(-1, -2).contiguous(), mn.transpose(-1, -2).contiguous()
    codes, scale, mn = quantize_grouped_ref(x, bits, group_size, meta_dtype)
    return _pack_last_ref(codes, bits), scale, mn


def _dequantize_ref(q: QuantizedTensor, dtype) -> torch.Tensor:
    g = q.group_size
    if q.axis == "token":
        codes = _unpack_last_ref(q.packed.transpose(-1, -2), q.bits).float()  # (B, H, D, T)
        s = q.scale.transpose(-1, -2).float().repeat_interleave(g, dim=-1)
        m = q.minimum.transpose(-1, -2).float().repeat_interleave(g, dim=-1)
        return (codes * s + m).transpose(-1, -2).to(dtype)
    codes = _unpack_last_ref(q.packed, q.bits).float()
    s = q.scale.float().repeat_interleave(g, dim=-1)
    m = q.minimum.float().repeat_interleave(g, dim=-1)
    return (codes * s + m).to(dtype)


# --------------------------------------------------------------------------- Triton kernels
if HAS_TRITON:

    @triton.jit
    def _quant_pack_kernel(
        X, P, S, M, R,
        sxn, sxr, sxc, spn, spr, spc, smn, smr, smc,
        BITS: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        # One program: BLOCK_R rows x one group of G columns of the (N, R, C) view.
        PW: tl.constexpr = 32 // BITS
        NW: tl.constexpr = G // PW
        QMAX: tl.constexpr = (1 << BITS) - 1
        n = tl.program_id(0)
        g = tl.program_id(2)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        xbase = X + n * sxn + rows[:, None] * sxr
        cols = g * G + tl.arange(0, G)
        x = tl.load(xbase + cols[None, :] * sxc, mask=rmask[:, None], other=0.0).to(tl.float32)
        mn = tl.min(x, axis=1)
        mx = tl.max(x, axis=1)
        mn_s = (mn - tl.abs(mn) * 0.0009765625).to(M.dtype.element_ty)
        mn = mn_s.to(tl.float32)
        scale_s = ((mx - mn) / QMAX * 1.0009765625).to(S.dtype.element_ty)
        scale = scale_s.to(tl.float32)
        pos = scale > 0
        inv = tl.where(pos, 1.0 / tl.where(pos, scale, 1.0), 0.0)
        w = tl.arange(0, NW)
        acc = tl.zeros([BLOCK_R, NW], dtype=tl.int32)
        for j in tl.static_range(PW):
            c = g * G + w * PW + j
            xj = tl.load(xbase + c[None, :] * sxc, mask=rmask[:, None], other=0.0).to(tl.float32)
            q = tl.floor((xj - mn[:, None]) * inv[:, None] + 0.5)
            q = tl.minimum(tl.maximum(q, 0.0), QMAX).to(tl.int32)
            acc = acc | (q << (j * BITS))
        tl.store(P + n * spn + rows[:, None] * spr + (g * NW + w)[None, :] * spc, acc, mask=rmask[:, None])
        tl.store(S + n * smn + rows * smr + g * smc, scale_s, mask=rmask)
        tl.store(M + n * smn + rows * smr + g * smc, mn_s, mask=rmask)

    @triton.jit
    def _dequant_kernel(
        Y, P, S, M, R,
        syn, syr, syc, spn, spr, spc, smn, smr, smc,
        BITS: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        PW: tl.constexpr = 32 // BITS
        NW: tl.constexpr = G // PW
        MASK: tl.constexpr = (1 << BITS) - 1
        n = tl.program_id(0)
        g = tl.program_id(2)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        w = tl.arange(0, NW)
        words = tl.load(P + n * spn + rows[:, None] * spr + (g * NW + w)[None, :] * spc, mask=rmask[:, None], other=0)
        scale = tl.load(S + n * smn + rows * smr + g * smc, mask=rmask, other=0.0).to(tl.float32)
        mn = tl.load(M + n * smn + rows * smr + g * smc, mask=rmask, other=0.0).to(tl.float32)
        for j in tl.static_range(PW):
            code = ((words >> (j * BITS)) & MASK).to(tl.float32)
            y = code * scale[:, None] + mn[:, None]
            c = g * G + w * PW + j
            tl.store(Y + n * syn + rows[:, None] * syr + c[None, :] * syc, y.to(Y.dtype.element_ty), mask=rmask[:, None])


_BLOCK_R = 32


def _quantize_triton(x, bits, group_size, axis, meta_dtype):
    b, h, t, d = x.shape
    n = b * h
    x3 = x.reshape(n, t, d)
    per_word = 32 // bits
    if axis == "token":  # rows = channels, columns = tokens
        rows, cols = d, t
        packed = torch.empty(n, t // per_word, d, dtype=torch.int32, device=x.device)
        scale = torch.empty(n, t // group_size, d, dtype=meta_dtype, device=x.device)
        sx = (x3.stride(0), x3.stride(2), x3.stride(1))
        sp = (packed.stride(0), packed.stride(2), packed.stride(1))
        sm = (scale.stride(0), scale.stride(2), scale.stride(1))
    else:
        rows, cols = t, d
        packed = torch.empty(n, t, d // per_word, dtype=torch.int32, device=x.device)
        scale = torch.empty(n, t, d // group_size, dtype=meta_dtype, device=x.device)
        sx = x3.stride()
        sp = packed.stride()
        sm = scale.stride()
    mn = torch.empty_like(scale)
    grid = (n, triton.cdiv(rows, _BLOCK_R), cols // group_size)
    _quant_pack_kernel[grid](x3, packed, scale, mn, rows, *sx, *sp, *sm, BITS=bits, G=group_size, BLOCK_R=_BLOCK_R)
    return (packed.reshape(b, h, *packed.shape[1:]), scale.reshape(b, h, *scale.shape[1:]),
            mn.reshape(b, h, *mn.shape[1:]))


def _dequantize_triton(q: QuantizedTensor, dtype):
    b, h, t, d = q.shape
    n = b * h
    y = torch.empty(n, t, d, dtype=dtype, device=q.packed.device)
    p = q.packed.reshape(n, *q.packed.shape[2:])
    s = q.scale.reshape(n, *q.scale.shape[2:])
    m = q.minimum.reshape(n, *q.minimum.shape[2:])
    if q.axis == "token":
        rows, cols = d, t
        sy, sp, sm = (y.stride(0), y.stride(2), y.stride(1)), (p.stride(0), p.stride(2), p.stride(1)), (
            s.stride(0), s.stride(2), s.stride(1))
    else:
        rows, cols = t, d
        sy, sp, sm = y.stride(), p.stride(), s.stride()
    grid = (n, triton.cdiv(rows, _BLOCK_R), cols // q.group_size)
    _dequant_kernel[grid](y, p, s, m, rows, *sy, *sp, *sm, BITS=q.bits, G=q.group_size, BLOCK_R=_BLOCK_R)
    return y.reshape(b, h, t, d)


# --------------------------------------------------------------------------- public API
def _quantize(x, bits, group_size, axis, meta_dtype, backend):
    if x.dim() != 4:
        raise ValueError(f"expected (batch, heads, tokens, head_dim), got shape {tuple(x.shape)}")
    _check(bits, group_size)
    t, d = x.shape[-2:]
    along = t if axis == "token" else d
    if along % group_size:
        raise ValueError(f"the {'token' if axis == 'token' else 'channel'} count {along} is not a multiple "
                         f"of group_size {group_size}")
    if pick_backend(backend, x) == "triton":
        packed, scale, mn = _quantize_triton(x, bits, group_size, axis, meta_dtype)
    else:
        packed, scale, mn = _quantize_ref(x, bits, group_size, axis, meta_dtype)
    return QuantizedTensor(packed, scale, mn, bits, group_size, axis, tuple(x.shape))


def quantize_keys(k: torch.Tensor, bits: int = 4, group_size: int = 32, *, meta_dtype=torch.float16,
                  backend: str = "auto") -> QuantizedTensor:
    """Per-channel quantization of keys ``(B, H, T, D)``; ``T`` must be a multiple of ``group_size``."""
    return _quantize(k, bits, group_size, "token", meta_dtype, backend)


def quantize_values(v: torch.Tensor, bits: int = 4, group_size: int = 32, *, meta_dtype=torch.float16,
                    backend: str = "auto") -> QuantizedTensor:
    """Per-token quantization of values ``(B, H, T, D)``; ``D`` must be a multiple of ``group_size``."""
    return _quantize(v, bits, group_size, "channel", meta_dtype, backend)


def dequantize(q: QuantizedTensor, dtype=torch.float32, *, backend: str = "auto") -> torch.Tensor:
    """Unpack and dequantize to a ``(B, H, T, D)`` tensor of ``dtype``."""
    if pick_backend(backend, q.packed) == "triton":
        return _dequantize_triton(q, dtype)
    return _dequantize_ref(q, dtype)

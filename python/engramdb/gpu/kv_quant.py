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

**8-bit metadata (``meta_bits=8``, double quantization).** fp16 scale and minimum cost 32 bits per
group, i.e. 1 bit per element at ``G = 32``. With ``meta_bits=8`` they are stored as uint8 codes
against three fp16 numbers per *super-block*, the ``D`` groups that cover one group of ``G`` tokens of
one head (keys: one token group x all ``D`` channels; values: ``G`` tokens x ``D // G`` channel groups):

=========  =======================  ======================  =====================================
tensor     keys                     values                  dtype
=========  =======================  ======================  =====================================
scale      ``(B, H, T // G, D)``    ``(B, H, T, D // G)``   uint8 code ``s8``
minimum    ``(B, H, T // G, D)``    ``(B, H, T, D // G)``   uint8 code ``m8``
sup        ``(B, H, T // G, 3)``    ``(B, H, T // G, 3)``   fp16 ``(sstep, mbase, mstep)``
=========  =======================  ======================  =====================================

effective ``minimum = mbase + m8 * mstep`` (``mbase`` the block's smallest group minimum rounded
down, ``m8 = floor(...)`` so it never exceeds the group's minimum) and effective ``scale = s8 *
sstep`` with ``s8 = ceil((max - minimum) / qmax / sstep)``, so the group's range stays covered and the
half-step bound holds against the *effective* scale. Cost: ``16 / G + 48 / (G * D)`` bits per element
instead of ``32 / G`` (0.52 instead of 1 at ``G = 32, D = 64``).

``meta_round="nearest"`` rounds both 8-bit codes to nearest instead (the scale code from the group's own
range), clamping the few elements that fall outside the rounded range: a looser worst case, but the
effective step is no longer up to one super-step coarser than the group needs, which on SmolLM2's real
keys brought the attention-output error back to the fp16-metadata level (benches/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from ._triton import HAS_TRITON, cdiv, next_pow2, pick_backend, tl, triton

__all__ = [
    "QuantizedTensor",
    "quantize_keys",
    "quantize_values",
    "dequantize",
    "quantize_grouped_ref",
    "effective_meta",
    "bits_per_element",
    "step_at",
    "refine_encode",
    "refine_decode",
    "hadamard",
    "to_mma_order",
    "from_mma_order",
]


@dataclass(frozen=True)
class QuantizedTensor:
    """A packed KIVI tensor; ``axis`` is ``"token"`` for keys and ``"channel"`` for values.

    Checked when made (:meth:`validate`: a ``ValueError`` if its tensors do not fit its shape, bits, group
    size, axis and order) and frozen, so that the kernels, which trust it, need not check it again on every
    decode step; ``dataclasses.replace`` makes a checked copy with some fields changed."""

    packed: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    bits: int
    group_size: int
    axis: str
    shape: tuple  # (B, H, T, D) of the dequantized tensor
    sup: Optional[torch.Tensor] = None  # (B, H, T // G, 3) fp16 when scale/minimum are 8-bit codes
    order: str = "kivi"  # how codes sit in the packed words: "kivi", "mma" or "mma_w" (see to_mma_order)

    def __post_init__(self):
        self.validate()

    @property
    def meta_bits(self) -> int:
        return 16 if self.sup is None else 8

    def tensors(self) -> tuple:
        return (self.packed, self.scale, self.minimum) + (() if self.sup is None else (self.sup,))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def validate(self) -> QuantizedTensor:
        """``self``, or a ``ValueError`` if its tensors do not fit ``shape``, ``bits``, ``group_size`` and
        ``axis`` (the kernels trust them: a short ``packed`` would be read past its end on a GPU). Runs when
        the tensor is made; call it again only after changing a tensor's shape in place (``resize_``)."""
        def bad(what):
            return ValueError(f"inconsistent QuantizedTensor ({self.axis}, {self.bits}-bit, group {self.group_size}, "
                              f"shape {tuple(self.shape)}): {what}")

        if self.axis not in ("token", "channel") or self.order not in ("kivi", "mma", "mma_w"):
            raise bad(f"axis {self.axis!r} / order {self.order!r}")
        per_word = check_bits(self.bits, self.group_size)
        if len(self.shape) != 4:
            raise bad("shape must be (B, H, T, D)")
        b, h, t, d = self.shape
        if self.packed.dtype != torch.int32 or tuple(self.packed.shape[:2]) != (b, h) or \
                self.packed.numel() * per_word != b * h * t * d:
            raise bad(f"packed is {self.packed.dtype} {tuple(self.packed.shape)}")
        along = t if self.axis == "token" else d
        if along % self.group_size:
            raise bad(f"the grouped axis ({along}) is not whole groups")
        meta = (b, h, t // self.group_size, d) if self.axis == "token" else (b, h, t, d // self.group_size)
        for name, x in (("scale", self.scale), ("minimum", self.minimum)):
            if tuple(x.shape) != meta:
                raise bad(f"{name} is {tuple(x.shape)}, expected {meta}")
        if self.sup is not None and (t % self.group_size or tuple(self.sup.shape) != (b, h, t // self.group_size, 3)):
            raise bad(f"sup is {tuple(self.sup.shape)}, expected {(b, h, t // self.group_size, 3)}")
        if any(x.device != self.packed.device for x in self.tensors()):
            raise bad("its tensors are on different devices")
        return self


def bits_per_element(bits: int, group_size: int, head_dim: int, meta_bits: int = 16) -> float:
    """Storage cost of the quantized part per element: codes + metadata (the formula ``nbytes`` meets)."""
    if meta_bits == 16:
        return bits + 32 / group_size
    return bits + 16 / group_size + 48 / (group_size * head_dim)


def check_bits(bits: int, group_size: int) -> int:
    """Codes a packed 32-bit word holds at ``bits``, or a ``ValueError`` for bits or a group size we do not pack."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    per_word = 32 // bits
    if group_size < per_word or group_size % per_word or group_size & (group_size - 1):
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


_UP = 1.0 + 2.0**-10  # widen before rounding to fp16, so that rounding to nearest never narrows


def _dq_meta_ref(mn: torch.Tensor, mx: torch.Tensor, qmax: int, nearest: bool = False):
    """8-bit metadata for per-group ``mn``/``mx`` of shape ``(..., blocks, E)`` (E groups per super-block).

    Returns ``(s8, m8, sup, scale_eff, min_eff)``; the same float32 operations, in the same order, as
    the Triton kernel, so both give identical codes. ``nearest`` (``meta_round="nearest"``): both codes
    rounded to nearest, the scale code from the group's own range (see :func:`quantize_keys`).
    """
    lo = mn.amin(-1, keepdim=True)
    hi = mn.amax(-1, keepdim=True)
    mbase_h = (lo - lo.abs() * 2.0**-10).to(torch.float16)
    mbase = mbase_h.float()
    mstep_h = ((hi - mbase) / 255.0 * _UP).to(torch.float16)
    mstep = mstep_h.float()
    inv_m = torch.where(mstep > 0, 1.0 / torch.where(mstep > 0, mstep, torch.ones_like(mstep)),
                        torch.zeros_like(mstep))
    if nearest:
        m8 = torch.floor((mn - mbase) * inv_m + 0.5).clamp_(0, 255)
    else:
        m8 = torch.floor((mn - mbase) * inv_m).clamp_(0, 255)
    min_eff = mbase + m8 * mstep
    need = (mx - mn) / qmax if nearest else (mx - min_eff) / qmax
    sstep_h = (need.amax(-1, keepdim=True) / 255.0 * _UP).to(torch.float16)
    sstep = sstep_h.float()
    inv_s = torch.where(sstep > 0, 1.0 / torch.where(sstep > 0, sstep, torch.ones_like(sstep)),
                        torch.zeros_like(sstep))
    if nearest:
        s8 = torch.floor(need * inv_s + 0.5).clamp_(1, 255)
    else:
        s8 = torch.ceil(need * inv_s).clamp_(0, 255)
    scale_eff = s8 * sstep
    sup = torch.cat([sstep_h, mbase_h, mstep_h], -1)
    return s8.to(torch.uint8), m8.to(torch.uint8), sup, scale_eff, min_eff


def _codes_ref(xg, mnf, sf, qmax):
    inv = torch.where(sf > 0, 1.0 / torch.where(sf > 0, sf, torch.ones_like(sf)), torch.zeros_like(sf))
    return torch.floor((xg - mnf) * inv + 0.5).clamp_(0, qmax)


def _quantize_dq_ref(x, bits, group_size, axis, nearest=False):
    """``meta_bits=8``: returns ``(packed, s8, m8, sup)`` in the layouts of the module docstring."""
    qmax = (1 << bits) - 1
    g = group_size
    b, h, t, d = x.shape
    if axis == "token":
        xg = x.float().transpose(-1, -2).reshape(b, h, d, t // g, g)  # (B, H, D, T/G, G)
        mn = xg.amin(-1).transpose(-1, -2)  # (B, H, T/G, D): one super-block per row
        mx = xg.amax(-1).transpose(-1, -2)
        s8, m8, sup, se, me = _dq_meta_ref(mn, mx, qmax, nearest)
        q = _codes_ref(xg, me.transpose(-1, -2)[..., None], se.transpose(-1, -2)[..., None], qmax)
        packed = _pack_last_ref(q.to(torch.uint8).reshape(b, h, d, t), bits).transpose(-1, -2).contiguous()
        return packed, s8.contiguous(), m8.contiguous(), sup.contiguous()
    xg = x.float().reshape(b, h, t, d // g, g)
    mn = xg.amin(-1).reshape(b, h, t // g, d)  # G tokens x D/G groups per super-block
    mx = xg.amax(-1).reshape(b, h, t // g, d)
    s8, m8, sup, se, me = _dq_meta_ref(mn, mx, qmax, nearest)
    q = _codes_ref(xg, me.reshape(b, h, t, d // g)[..., None], se.reshape(b, h, t, d // g)[..., None], qmax)
    packed = _pack_last_ref(q.to(torch.uint8).reshape(b, h, t, d), bits)
    return packed, s8.reshape(b, h, t, d // g), m8.reshape(b, h, t, d // g), sup


def effective_meta(q: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Effective (float32) scale and minimum, in the layout of ``q.scale``."""
    if q.sup is None:
        return q.scale.float(), q.minimum.float()
    sup = q.sup.float()
    if q.axis == "channel":  # values: one super-block per G tokens
        sup = sup.repeat_interleave(q.group_size, dim=2)
    sstep, mbase, mstep = sup[..., 0:1], sup[..., 1:2], sup[..., 2:3]
    return q.scale.float() * sstep, mbase + q.minimum.float() * mstep


def step_at(q: QuantizedTensor, idx: torch.Tensor) -> torch.Tensor:
    """Effective quantization step of every element of tokens ``idx`` ``(B, H, N)``: ``(B, H, N, D)`` float32."""
    scale, _ = effective_meta(q)
    if q.axis == "token":  # keys: scale (B, H, T // G, D), one row per token group
        rows = torch.div(idx.long(), q.group_size, rounding_mode="floor")
        return torch.gather(scale, 2, rows[..., None].expand(-1, -1, -1, scale.shape[-1]))
    s = torch.gather(scale, 2, idx.long()[..., None].expand(-1, -1, -1, scale.shape[-1]))  # (B, H, N, D // G)
    return s.repeat_interleave(q.group_size, dim=-1)


def hadamard(d: int, device=None) -> torch.Tensor:
    """The ``d x d`` Sylvester Hadamard matrix divided by ``sqrt(d)`` (float32): orthonormal and symmetric,
    so it is its own inverse. ``d`` must be a power of two. Used by ``QuantizedKVCache(rotate_values=True)``:
    values are quantized per token across channels, and rotating a token's channels first spreads an outlier
    channel over all of them, so one large channel no longer sets the step of its whole group."""
    if d < 1 or d & (d - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two size, got {d}")
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / d**0.5


def refine_encode(x: torch.Tensor, xhat: torch.Tensor, step: torch.Tensor, extra_bits: int) -> torch.Tensor:
    """Mixed precision: ``extra_bits`` more bits for some tokens, as a code for the residual ``x - xhat``.

    ``xhat`` is the base dequantization, so ``|x - xhat| <= step / 2``; the residual's half-step interval
    is cut into ``2**extra_bits`` cells and the cell index is stored (packed along the last axis), so
    ``xhat + refine_decode(...)`` is within ``step / 2**(extra_bits + 1)`` of ``x``: the half step of a
    ``bits + extra_bits`` code over the same range, with no extra scale or minimum. (With
    ``meta_round="nearest"`` a clamped element's residual can exceed half a step; its cell index is clamped
    to the edge, so the bound holds only for the elements inside the rounded range.)
    """
    lv = 1 << extra_bits
    xf, step = x.float(), step.float()
    inv = torch.where(step > 0, 1.0 / torch.where(step > 0, step, torch.ones_like(step)), torch.zeros_like(step))
    c = torch.floor(((xf - xhat.float()) * inv + 0.5) * lv).clamp_(0, lv - 1)
    return _pack_last_ref(c.to(torch.uint8), extra_bits)


def refine_decode(packed: torch.Tensor, step: torch.Tensor, extra_bits: int) -> torch.Tensor:
    """The residual correction encoded by :func:`refine_encode` (float32, shape of ``step``)."""
    lv = 1 << extra_bits
    c = _unpack_last_ref(packed, extra_bits).float()
    return ((c + 0.5) / lv - 0.5) * step


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


def _pack_kivi(codes: torch.Tensor, bits: int, axis: str) -> torch.Tensor:
    """``(B, H, T, D)`` codes packed in KIVI order: keys along tokens, values along channels."""
    if axis == "token":
        return _pack_last_ref(codes.transpose(-1, -2), bits).transpose(-1, -2).contiguous()
    return _pack_last_ref(codes, bits)


def _codes(q: QuantizedTensor) -> torch.Tensor:
    """The ``(B, H, T, D)`` codes of a packed tensor, in any order."""
    if q.order in MMA_ORDERS:
        b, h, t, d = q.shape
        tok, chan = _mma_sources(q.bits, q.axis, t, d, q.packed.device, q.order)
        codes = torch.empty(b, h, t, d, dtype=torch.int32, device=q.packed.device)
        codes[:, :, tok, chan] = _unpack_last_ref(q.packed, q.bits).reshape(b, h, *tok.shape)
        return codes
    if q.axis == "token":
        return _unpack_last_ref(q.packed.transpose(-1, -2), q.bits).transpose(-1, -2)
    return _unpack_last_ref(q.packed, q.bits)


def _quantize_ref(x, bits, group_size, axis, meta_dtype):
    if axis == "token":  # keys: group along T -> work on (B, H, D, T)
        codes, scale, mn = quantize_grouped_ref(x.transpose(-1, -2), bits, group_size, meta_dtype)
        return _pack_kivi(codes.transpose(-1, -2), bits, axis), scale.transpose(-1, -2).contiguous(), \
            mn.transpose(-1, -2).contiguous()
    codes, scale, mn = quantize_grouped_ref(x, bits, group_size, meta_dtype)
    return _pack_kivi(codes, bits, axis), scale, mn


def _dequantize_ref(q: QuantizedTensor, dtype) -> torch.Tensor:
    """Either packing order: the codes are read back in place, not re-packed."""
    scale, minimum = effective_meta(q)
    dim = -2 if q.axis == "token" else -1  # keys: a row per token group; values: a column per channel group
    s = scale.repeat_interleave(q.group_size, dim=dim)
    m = minimum.repeat_interleave(q.group_size, dim=dim)
    return (_codes(q).float() * s + m).to(dtype)


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
    def _quant_pack_dq_kernel(
        X, P, S, M, SUP, NROWS,
        sxn, sxr, sxc, spn, spr, spc, smn, smr, smc, sun, suk,
        ROW_STEP: tl.constexpr, COL_STEP: tl.constexpr, NG: tl.constexpr,
        BITS: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr, NEAREST: tl.constexpr,
    ):
        # One program: one super-block of the (N, R, C) view = NROWS rows starting at k * ROW_STEP x NG
        # groups of G columns starting at k * COL_STEP (keys: all D channels x one token group; values:
        # G tokens x all D // G channel groups). Three passes over the block (the loads hit the cache):
        # range of the group minimums -> their 8-bit codes; largest needed scale -> 8-bit scale codes;
        # element codes, packed.
        PW: tl.constexpr = 32 // BITS
        NW: tl.constexpr = G // PW
        QMAX: tl.constexpr = (1 << BITS) - 1
        n = tl.program_id(0)
        k = tl.program_id(1)
        r = tl.arange(0, BLOCK_R)
        rmask = r < NROWS
        rows = k * ROW_STEP + r
        xbase = X + n * sxn + rows[:, None] * sxr
        cg = tl.arange(0, G)
        lo = tl.full([BLOCK_R], float("inf"), tl.float32)
        hi = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for j in tl.static_range(NG):
            cols = k * COL_STEP + j * G + cg
            x = tl.load(xbase + cols[None, :] * sxc, mask=rmask[:, None], other=0.0).to(tl.float32)
            mn = tl.min(x, axis=1)
            lo = tl.minimum(lo, tl.where(rmask, mn, float("inf")))
            hi = tl.maximum(hi, tl.where(rmask, mn, float("-inf")))
        lo_b = tl.min(lo, axis=0)
        hi_b = tl.max(hi, axis=0)
        mbase_s = (lo_b - tl.abs(lo_b) * 0.0009765625).to(tl.float16)
        mbase = mbase_s.to(tl.float32)
        mstep_s = ((hi_b - mbase) / 255.0 * 1.0009765625).to(tl.float16)
        mstep = mstep_s.to(tl.float32)
        inv_m = tl.where(mstep > 0, 1.0 / tl.where(mstep > 0, mstep, 1.0), 0.0)
        need_max = tl.zeros([BLOCK_R], tl.float32)
        for j in tl.static_range(NG):
            cols = k * COL_STEP + j * G + cg
            x = tl.load(xbase + cols[None, :] * sxc, mask=rmask[:, None], other=0.0).to(tl.float32)
            if NEAREST:
                need = (tl.max(x, axis=1) - tl.min(x, axis=1)) / QMAX
            else:
                m8 = tl.minimum(tl.maximum(tl.floor((tl.min(x, axis=1) - mbase) * inv_m), 0.0), 255.0)
                need = (tl.max(x, axis=1) - (mbase + m8 * mstep)) / QMAX
            need_max = tl.maximum(need_max, tl.where(rmask, need, 0.0))
        sstep_s = (tl.max(need_max, axis=0) / 255.0 * 1.0009765625).to(tl.float16)
        sstep = sstep_s.to(tl.float32)
        inv_s = tl.where(sstep > 0, 1.0 / tl.where(sstep > 0, sstep, 1.0), 0.0)
        w = tl.arange(0, NW)
        for j in tl.static_range(NG):
            g = k * COL_STEP // G + j  # group index along the columns
            cols = g * G + cg
            x = tl.load(xbase + cols[None, :] * sxc, mask=rmask[:, None], other=0.0).to(tl.float32)
            if NEAREST:
                m8 = tl.minimum(tl.maximum(tl.floor((tl.min(x, axis=1) - mbase) * inv_m + 0.5), 0.0), 255.0)
                mn = mbase + m8 * mstep
                need = (tl.max(x, axis=1) - tl.min(x, axis=1)) / QMAX
                s8 = tl.minimum(tl.maximum(tl.floor(need * inv_s + 0.5), 1.0), 255.0)
            else:
                m8 = tl.minimum(tl.maximum(tl.floor((tl.min(x, axis=1) - mbase) * inv_m), 0.0), 255.0)
                mn = mbase + m8 * mstep
                need = (tl.max(x, axis=1) - mn) / QMAX
                s8 = tl.minimum(tl.maximum(tl.ceil(need * inv_s), 0.0), 255.0)
            scale = s8 * sstep
            pos = scale > 0
            inv = tl.where(pos, 1.0 / tl.where(pos, scale, 1.0), 0.0)
            acc = tl.zeros([BLOCK_R, NW], dtype=tl.int32)
            for jj in tl.static_range(PW):
                c = g * G + w * PW + jj
                xj = tl.load(xbase + c[None, :] * sxc, mask=rmask[:, None], other=0.0).to(tl.float32)
                q = tl.floor((xj - mn[:, None]) * inv[:, None] + 0.5)
                q = tl.minimum(tl.maximum(q, 0.0), QMAX).to(tl.int32)
                acc = acc | (q << (jj * BITS))
            tl.store(P + n * spn + rows[:, None] * spr + (g * NW + w)[None, :] * spc, acc, mask=rmask[:, None])
            tl.store(S + n * smn + rows * smr + g * smc, s8.to(tl.uint8), mask=rmask)
            tl.store(M + n * smn + rows * smr + g * smc, m8.to(tl.uint8), mask=rmask)
        tl.store(SUP + n * sun + k * suk, sstep_s)
        tl.store(SUP + n * sun + k * suk + 1, mbase_s)
        tl.store(SUP + n * sun + k * suk + 2, mstep_s)

    @triton.jit
    def _dequant_kernel(
        Y, P, S, M, SUP, R,
        syn, syr, syc, spn, spr, spc, smn, smr, smc, sun, suk,
        BITS: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr, DQ: tl.constexpr, ROWS_ARE_TOKENS: tl.constexpr,
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
        scale = tl.load(S + n * smn + rows * smr + g * smc, mask=rmask, other=0).to(tl.float32)
        mn = tl.load(M + n * smn + rows * smr + g * smc, mask=rmask, other=0).to(tl.float32)
        if DQ:  # 8-bit codes against the super-block's (sstep, mbase, mstep)
            if ROWS_ARE_TOKENS:
                blk = rows // G
            else:
                blk = rows * 0 + g
            sp = SUP + n * sun + blk * suk
            sstep = tl.load(sp, mask=rmask, other=0.0).to(tl.float32)
            mbase = tl.load(sp + 1, mask=rmask, other=0.0).to(tl.float32)
            mstep = tl.load(sp + 2, mask=rmask, other=0.0).to(tl.float32)
            scale = scale * sstep
            mn = mbase + mn * mstep
        for j in tl.static_range(PW):
            code = ((words >> (j * BITS)) & MASK).to(tl.float32)
            y = code * scale[:, None] + mn[:, None]
            c = g * G + w * PW + j
            tl.store(Y + n * syn + rows[:, None] * syr + c[None, :] * syc, y.to(Y.dtype.element_ty), mask=rmask[:, None])


_BLOCK_R = 32
META_ROUNDS = ("cover", "nearest")


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
    grid = (n, cdiv(rows, _BLOCK_R), cols // group_size)
    _quant_pack_kernel[grid](x3, packed, scale, mn, rows, *sx, *sp, *sm, BITS=bits, G=group_size, BLOCK_R=_BLOCK_R)
    return (packed.reshape(b, h, *packed.shape[1:]), scale.reshape(b, h, *scale.shape[1:]),
            mn.reshape(b, h, *mn.shape[1:]))


def _quantize_dq_triton(x, bits, group_size, axis, nearest=False):
    b, h, t, d = x.shape
    n = b * h
    x3 = x.reshape(n, t, d)
    per_word = 32 // bits
    g = group_size
    sup = torch.empty(n, t // g, 3, dtype=torch.float16, device=x.device)
    if axis == "token":  # rows = channels (all D in one block), columns = tokens (one group per block)
        packed = torch.empty(n, t // per_word, d, dtype=torch.int32, device=x.device)
        scale = torch.empty(n, t // g, d, dtype=torch.uint8, device=x.device)
        sx = (x3.stride(0), x3.stride(2), x3.stride(1))
        sp = (packed.stride(0), packed.stride(2), packed.stride(1))
        sm = (scale.stride(0), scale.stride(2), scale.stride(1))
        nrows, row_step, col_step, ng, block_r = d, 0, g, 1, next_pow2(d)
    else:  # rows = tokens (G per block), columns = channels (all D // G groups per block)
        packed = torch.empty(n, t, d // per_word, dtype=torch.int32, device=x.device)
        scale = torch.empty(n, t, d // g, dtype=torch.uint8, device=x.device)
        sx, sp, sm = x3.stride(), packed.stride(), scale.stride()
        nrows, row_step, col_step, ng, block_r = g, g, 0, d // g, g
    mn = torch.empty_like(scale)
    _quant_pack_dq_kernel[(n, t // g)](
        x3, packed, scale, mn, sup, nrows, *sx, *sp, *sm, sup.stride(0), sup.stride(1),
        ROW_STEP=row_step, COL_STEP=col_step, NG=ng, BITS=bits, G=g, BLOCK_R=block_r, NEAREST=nearest)
    return (packed.reshape(b, h, *packed.shape[1:]), scale.reshape(b, h, *scale.shape[1:]),
            mn.reshape(b, h, *mn.shape[1:]), sup.reshape(b, h, t // g, 3))


def _dequantize_triton(q: QuantizedTensor, dtype):
    b, h, t, d = q.shape
    n = b * h
    y = torch.empty(n, t, d, dtype=dtype, device=q.packed.device)
    p = q.packed.reshape(n, *q.packed.shape[2:])
    s = q.scale.reshape(n, *q.scale.shape[2:])
    m = q.minimum.reshape(n, *q.minimum.shape[2:])
    dq = q.sup is not None
    u = q.sup.reshape(n, t // q.group_size, 3) if dq else s
    if q.axis == "token":
        rows, cols = d, t
        sy, sp, sm = (y.stride(0), y.stride(2), y.stride(1)), (p.stride(0), p.stride(2), p.stride(1)), (
            s.stride(0), s.stride(2), s.stride(1))
    else:
        rows, cols = t, d
        sy, sp, sm = y.stride(), p.stride(), s.stride()
    grid = (n, cdiv(rows, _BLOCK_R), cols // q.group_size)
    _dequant_kernel[grid](y, p, s, m, u, rows, *sy, *sp, *sm, u.stride(0), u.stride(1),
                          BITS=q.bits, G=q.group_size, BLOCK_R=_BLOCK_R, DQ=dq, ROWS_ARE_TOKENS=q.axis == "channel")
    return y.reshape(b, h, t, d)


# --------------------------------------------------------------------------- public API
def _quantize(x, bits, group_size, axis, meta_dtype, backend, meta_bits=16, meta_round="cover"):
    if x.dim() != 4:
        raise ValueError(f"expected (batch, heads, tokens, head_dim), got shape {tuple(x.shape)}")
    check_bits(bits, group_size)
    t, d = x.shape[-2:]
    along = t if axis == "token" else d
    if along % group_size:
        raise ValueError(f"the {'token' if axis == 'token' else 'channel'} count {along} is not a multiple "
                         f"of group_size {group_size}")
    if meta_bits not in (8, 16):
        raise ValueError(f"meta_bits must be 8 or 16, got {meta_bits}")
    if meta_bits == 8 and t % group_size:  # (one super-block per group of tokens, for values too)
        raise ValueError(f"meta_bits=8 needs whole groups of tokens: the token count {t} is not a multiple of "
                         f"group_size {group_size}")
    if meta_round not in META_ROUNDS:
        raise ValueError(f"meta_round must be one of {META_ROUNDS}, got {meta_round!r}")
    triton_path = pick_backend(backend, x) == "triton"
    if meta_bits == 8:
        fn = _quantize_dq_triton if triton_path else _quantize_dq_ref
        packed, scale, mn, sup = fn(x, bits, group_size, axis, meta_round == "nearest")
        return QuantizedTensor(packed, scale, mn, bits, group_size, axis, tuple(x.shape), sup)
    if triton_path:
        packed, scale, mn = _quantize_triton(x, bits, group_size, axis, meta_dtype)
    else:
        packed, scale, mn = _quantize_ref(x, bits, group_size, axis, meta_dtype)
    return QuantizedTensor(packed, scale, mn, bits, group_size, axis, tuple(x.shape))


def quantize_keys(k: torch.Tensor, bits: int = 4, group_size: int = 32, *, meta_dtype=torch.float16,
                  meta_bits: int = 16, meta_round: str = "cover", backend: str = "auto") -> QuantizedTensor:
    """Per-channel quantization of keys ``(B, H, T, D)``; ``T`` must be a multiple of ``group_size``.

    ``meta_bits=8`` stores scale and minimum as 8-bit codes (see the module docstring). ``meta_round``
    (``meta_bits=8`` only): ``"cover"`` (minimum code rounded down, scale code up, so every element is
    within half an effective step) or ``"nearest"`` (both codes rounded to nearest, the scale code from
    the group's own range; elements outside the rounded range are clamped, so the bound loosens to
    ``scale / 2 + mstep / 2 + qmax * sstep / 2``, but the effective scale and minimum are closer to the
    group's own on average)."""
    return _quantize(k, bits, group_size, "token", meta_dtype, backend, meta_bits, meta_round)


def quantize_values(v: torch.Tensor, bits: int = 4, group_size: int = 32, *, meta_dtype=torch.float16,
                    meta_bits: int = 16, meta_round: str = "cover", backend: str = "auto") -> QuantizedTensor:
    """Per-token quantization of values ``(B, H, T, D)``; ``D`` must be a multiple of ``group_size``.

    ``meta_bits=8`` stores scale and minimum as 8-bit codes (see the module docstring); ``meta_round``
    as in :func:`quantize_keys`."""
    return _quantize(v, bits, group_size, "channel", meta_dtype, backend, meta_bits, meta_round)


# ----------------------------------------------------------------- tensor-core operand order ("mma")
# Within a 32-element block, code c' (< 8) of word j holds element 4 j + (c' & 3) + 16 (c' >> 2): what one
# thread holds of a 16-bit mma.m16n8k16 operand fragment as Triton lays it out (four consecutive k a thread,
# kWidth 4), for two k-blocks of 16. Keys are stored token-major, values channel-major (the reverse of
# KIVI's packing axes): the decode kernel then loads every word into the thread whose dot operand needs it
# and dequantizes it there, with no trip through shared memory. A 2-bit word holds two such sets of eight
# codes (c = c' + 8 i): keys of tokens t and t + 8, values of channels n and n + 8.
#   4-bit keys    (T, D / 8):       row t, word j * D / 32 + b: channels 32 b + elt(j, c), token t
#   4-bit values  (T / 8, D):       row 4 a + j, channel n: tokens 32 a + elt(j, c)
#   2-bit keys    (T / 2, D / 8):   row 8 u + l, word j * D / 32 + b: channels 32 b + elt(j, c'),
#                                   token 16 u + l + 8 i
#   2-bit values  (T / 8, D / 2):   row 4 a + j, word 8 p + l: tokens 32 a + elt(j, c'), channel 16 p + l + 8 i
# Values also come in a second operand order, "mma_w", for a kernel whose warps each take their own 16
# tokens of a tile (a batched dot, warp w on batch w): thread (w, nl, kl) needs 4 tokens x D / 8 channels.
# Code c = i0 + 2 i1 + 4 i2 of word (row 4 s + kl, word nl * D / 16 + j) holds token 16 s + 4 kl + 2 i1 + i0
# and operand column 16 j + 8 i2 + nl, which stands for channel D / 8 * nl + 2 j + i2: a thread's channels
# lie in one quantization group (G >= D / 8). 4-bit only:
#   4-bit values  (T / 4, D / 2):   row 4 s + kl, word nl * D / 16 + j
MMA_BITS = (4, 2)
MMA_ORDERS = ("mma", "mma_w")


def _slot_codes(bits: int, device) -> torch.Tensor:
    """Which code ``c = i0 + 2 i1 + ...`` of the operand layout each bit slot of an mma-ordered word holds:
    the codes ``i0 = 0, 1`` (neighbours in one register of a tensor-core operand) sit in the low and the
    high 16 bits at the same offset, so one mask of the word gives the kernel both, already paired (4-bit:
    slots hold codes 0 2 4 6 1 3 5 7)."""
    p = torch.arange(32 // bits, device=device)
    half = 16 // bits
    return p // half + 2 * (p % half)


def _mma_sources(bits: int, axis: str, t: int, d: int, device, order: str = "mma"):
    """For each code of an mma-ordered packed tensor, the (token, channel) it holds: two int64 tensors of
    shape ``(rows, words per row, codes per word)``."""
    nb = d // 32
    per = 32 // bits
    c = _slot_codes(bits, device)  # the code (as the layout below numbers them) each slot of a word holds
    if order == "mma_w":  # 4-bit values, a warp per 16 tokens (layout above)
        r = torch.arange(t // 4, device=device)[:, None, None]
        col = torch.arange(d // 2, device=device)[None, :, None]
        nl, j = col // (d // 16), col % (d // 16)
        tok = 16 * (r // 4) + 4 * (r % 4) + 2 * ((c >> 1) & 1) + (c & 1)
        chan = d // 8 * nl + 2 * j + (c >> 2)
        shape = (r.shape[0], col.shape[1], per)
        return tok.expand(shape), chan.expand(shape)
    cc, i = c % 8, c // 8  # code within its set of eight, and which set (2-bit only)
    elt = lambda j: 4 * j + (cc & 3) + 16 * (cc >> 2)  # noqa: E731
    if axis == "token":
        rows = t if bits == 4 else t // 2
        r = torch.arange(rows, device=device)[:, None, None]
        col = torch.arange(d // 8, device=device)[None, :, None]
        j, b = col // nb, col % nb
        chan = 32 * b + elt(j)
        tok = r if bits == 4 else 16 * (r // 8) + r % 8 + 8 * i
    else:
        r = torch.arange(t // 8, device=device)[:, None, None]
        a, j = r // 4, r % 4
        tok = 32 * a + elt(j)
        col = torch.arange(d if bits == 4 else d // 2, device=device)[None, :, None]
        chan = col if bits == 4 else 16 * (col // 8) + col % 8 + 8 * i
    shape = (r.shape[0], col.shape[1], per)
    return tok.expand(shape), chan.expand(shape)


def to_mma_order(q: QuantizedTensor, *, warps: bool = False) -> QuantizedTensor:
    """The same codes re-packed in tensor-core operand order (``order="mma"``, layout above), which
    :func:`decode_attention.kivi_decode_attention` reads without staging tiles in shared memory. Needs
    2- or 4-bit codes, a head size that is a multiple of 32, a token count that is a multiple of 32 for
    values and of 16 for 2-bit keys. ``warps=True`` (4-bit values, head size 64 or 128): the order of the
    kernel that gives each warp its own 16 tokens of a tile (``order="mma_w"``; its keys stay in "mma"
    order). Scales, minimums and the byte count are unchanged; :func:`from_mma_order` inverts it."""
    order = "mma_w" if warps else "mma"
    if q.order == order:
        return q
    b, h, t, d = q.shape
    if q.bits not in MMA_BITS or d % 32 or (q.axis == "channel" and t % 32) or (q.bits == 2 and t % 16):
        raise ValueError(f"mma order needs 2- or 4-bit codes, a head size that is a multiple of 32 and a token "
                         f"count that is a multiple of 32 (values) or 16 (2-bit keys); got {q.bits} bits, "
                         f"shape {q.shape}")
    if warps and (q.axis != "channel" or q.bits != 4 or d not in (64, 128)):
        raise ValueError(f"mma_w order is for 4-bit values of head size 64 or 128; got {q.bits}-bit {q.axis} "
                         f"codes, shape {q.shape}")
    codes = _codes(q)  # (B, H, T, D)
    tok, chan = _mma_sources(q.bits, q.axis, t, d, codes.device, order)
    packed = _pack_last_ref(codes[:, :, tok, chan].reshape(b, h, tok.shape[0], -1), q.bits)
    if warps:  # the scales with each group's tokens adjacent: a thread reads its 4 tokens' in one load
        return replace(q, packed=packed.contiguous(), order=order, scale=token_contiguous(q.scale),
                       minimum=token_contiguous(q.minimum))
    return replace(q, packed=packed.contiguous(), order=order)


def from_mma_order(q: QuantizedTensor) -> QuantizedTensor:
    """Inverse of :func:`to_mma_order`: the codes in KIVI's packing (``order="kivi"``)."""
    if q.order not in MMA_ORDERS:
        return q
    return replace(q, packed=_pack_kivi(_codes(q), q.bits, q.axis), order="kivi", scale=q.scale.contiguous(),
                   minimum=q.minimum.contiguous())


def token_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, H, T, N)`` (per-token scales or minimums of N channel groups) with each group's tokens
    adjacent in memory: a transposed view of a contiguous ``(B, H, N, T)`` tensor. Values in mma_w order
    keep theirs so (the warps kernel reads a thread's 4 tokens of a group in one load)."""
    return x.transpose(2, 3).contiguous().transpose(2, 3)


def is_token_contiguous(x: torch.Tensor) -> bool:
    """Whether ``x`` ``(B, H, T, N)``, N > 1, is laid out as :func:`token_contiguous` makes it."""
    return x.shape[3] > 1 and x.stride(2) == 1


def cat_tokens(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` and ``b`` ``(B, H, T, N)`` joined along the tokens, in ``a``'s memory layout (token-contiguous,
    :func:`token_contiguous`, stays so)."""
    if is_token_contiguous(a):
        return torch.cat([a.transpose(2, 3), b.transpose(2, 3)], 3).transpose(2, 3)
    return torch.cat([a, b], 2)


def dequantize(q: QuantizedTensor, dtype=torch.float32, *, backend: str = "auto") -> torch.Tensor:
    """Unpack and dequantize to a ``(B, H, T, D)`` tensor of ``dtype``."""
    if pick_backend(backend, q.packed) == "triton":
        return _dequantize_triton(from_mma_order(q), dtype)
    return _dequantize_ref(q, dtype)

"""``QuantizedKVCache``: a transformers ``Cache`` that stores keys and values the KIVI way.

Each layer keeps two parts: the oldest tokens quantized and packed (:mod:`kv_quant`; keys per
channel, values per token) and the most recent ``residual_length`` to ``residual_length +
group_size - 1`` tokens in the model's dtype. At the start of each ``update`` the residual window
gives whole groups of its oldest tokens to the quantized part, so at least ``residual_length``
recent tokens always stay in full precision; the prefill's own attention runs on full-precision
states (KIVI's prefill path) and the prefill is quantized at the next call.

``sink_tokens`` (default 0, i.e. plain KIVI) keeps the first tokens of the sequence in full precision
too, stored at the front of the window buffer. Small models put "attention sink" activations of
outsized magnitude there; quantizing them widens the ranges of their whole group (keys are grouped
along tokens). Decode attention does not depend on key order, so the fused kernel reads sinks and
window as one full-precision block.

``rotate_values`` quantizes values after a Hadamard rotation of their channels (``v @ H``, ``H``
orthonormal and symmetric, :func:`kv_quant.hadamard`): values are quantized per token across channels,
and the rotation spreads an outlier channel over the whole head instead of letting it set the step of
its group. The dequantize path rotates the dequantized values back; the fused path feeds the kernel
the rotated codes and the window rotated on the fly, and rotates the attention output back
(``softmax(qK) (V H) H = softmax(qK) V``). Keys are not rotated: they are quantized per channel.

Two ways to attend:

* default: ``update`` returns the dequantized cache (Triton dequantize kernel on CUDA, torch on
  the CPU) followed by the window, so any attention implementation works (this is what the CPU
  quality benchmark uses);
* ``fused_attention=True`` with the model's attention set to :data:`ATTENTION_NAME` (see
  :func:`register_attention`): a decode step returns a marker instead, and the attention function
  calls :func:`decode_attention.kivi_decode_attention`, which reads the packed cache directly.
  Prefill steps and masked (padded) batches fall back to dequantize + SDPA.

This follows the per-layer ``CacheLayerMixin`` interface of transformers 5.x (``update``,
``get_seq_length``, ``get_mask_sizes``, ``get_max_length``, ``reset``, ``reorder_cache``, ``crop``, ...), in the
forms of 5.0 to the present (the tests pass with 5.0.0 and 5.24.0: the renames and the two forms of ``crop``
between are all answered). ``crop`` takes back the newest tokens from the full-precision window, which is
what assisted decoding and prompt lookup (``generate(prompt_lookup_num_tokens=...)``) do with rejected drafts.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from transformers.cache_utils import (
    Cache,
    CacheLayerMixin,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ._triton import pick_backend
from .decode_attention import kivi_decode_attention, mma_kernel_takes, warps_kernel_takes
from .kv_quant import (
    QuantizedTensor,
    cat_tokens,
    check_bits,
    dequantize,
    hadamard,
    is_token_contiguous,
    quantize_keys,
    quantize_values,
    refine_decode,
    refine_encode,
    step_at,
    to_mma_order,
)

__all__ = ["QuantizedKVCache", "QuantizedKVLayer", "register_attention", "ATTENTION_NAME", "kivi_attention_forward"]

ATTENTION_NAME = "engramdb_kivi"
_LAYER_ATTR = "_engramdb_kivi_layer"


def _cat_quantized(a: Optional[QuantizedTensor], b: QuantizedTensor) -> QuantizedTensor:
    if a is None:
        return b
    # every packing keeps tokens on dim 2 (KIVI order: key token words, value tokens; mma order: key tokens,
    # value word rows of 32 tokens; mma_w: value word rows of 4 tokens), so whole groups append there
    if a.order != b.order:
        raise ValueError(f"cannot append {b.order}-ordered codes to {a.order}-ordered ones")
    return QuantizedTensor(
        torch.cat([a.packed, b.packed], 2), cat_tokens(a.scale, b.scale), cat_tokens(a.minimum, b.minimum),
        a.bits, a.group_size, a.axis, (a.shape[0], a.shape[1], a.shape[2] + b.shape[2], a.shape[3]),
        None if a.sup is None else torch.cat([a.sup, b.sup], 2), a.order,
    )


def _on_batch(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn`` (a selection along the batch axis) applied to per-token scales in their memory layout."""
    if is_token_contiguous(x):
        return fn(x.transpose(2, 3)).transpose(2, 3)
    return fn(x)


def _index_quantized(q: Optional[QuantizedTensor], fn) -> Optional[QuantizedTensor]:
    if q is None:
        return None
    packed, scale, minimum = fn(q.packed), _on_batch(fn, q.scale), _on_batch(fn, q.minimum)
    return QuantizedTensor(packed, scale, minimum, q.bits, q.group_size, q.axis, (packed.shape[0], *q.shape[1:]),
                           None if q.sup is None else fn(q.sup), q.order)


class QuantizedKVLayer(CacheLayerMixin):
    """One attention layer's KIVI cache (see the module docstring)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, bits: int = 4, group_size: int = 32, residual_length: int = 32, *,
                 key_bits: Optional[int] = None, value_bits: Optional[int] = None,
                 meta_dtype: torch.dtype = torch.float16, backend: str = "auto", fused_attention: bool = False,
                 sink_tokens: int = 0, meta_bits: int = 16, important_ratio: float = 0.0, extra_bits: int = 2,
                 observation_window: int = 32, pool_kernel: int = 5, meta_round: str = "cover",
                 rotate_values: bool = False, operand_order=True):
        super().__init__()
        if operand_order not in (True, False, "mma", "warps"):
            raise ValueError(f"operand_order must be True, False, 'mma' or 'warps', got {operand_order!r}")
        self.operand_order = operand_order
        if meta_bits not in (8, 16):
            raise ValueError(f"meta_bits must be 8 or 16, got {meta_bits}")
        if meta_round not in ("cover", "nearest"):
            raise ValueError(f"meta_round must be 'cover' or 'nearest', got {meta_round!r}")
        self.meta_round = meta_round
        self.rotate_values = rotate_values
        self.rot: Optional[torch.Tensor] = None  # (D, D) float32 Hadamard matrix when rotate_values
        if not 0.0 <= important_ratio <= 1.0:
            raise ValueError("important_ratio must be in [0, 1]")
        if extra_bits not in (2, 4, 8):
            raise ValueError(f"extra_bits must be 2, 4 or 8, got {extra_bits}")
        self.meta_bits = meta_bits
        self.important_ratio = important_ratio
        self.extra_bits = extra_bits
        self.observation_window = observation_window
        self.pool_kernel = pool_kernel
        self.obs_q: Optional[torch.Tensor] = None  # the last `observation_window` queries (mixed precision)
        self.obs_scale: Optional[float] = None
        self.ref_idx: Optional[torch.Tensor] = None  # (B, H, N) int32: important tokens (index in the quantized part)
        self.ref_k: Optional[torch.Tensor] = None  # (B, H, N, D // (32 // extra_bits)) int32: their refinement codes
        self.ref_v: Optional[torch.Tensor] = None
        if sink_tokens < 0:
            raise ValueError("sink_tokens must be >= 0")
        for b in (key_bits or bits, value_bits or bits):  # (a bad setting fails here, not at the first flush)
            check_bits(b, group_size)
        if residual_length < 0 or residual_length % group_size:
            raise ValueError(f"residual_length ({residual_length}) must be a non-negative multiple of group_size "
                             f"({group_size})")
        self.key_bits = key_bits or bits
        self.value_bits = value_bits or bits
        self.group_size = group_size
        self.residual_length = residual_length
        self.meta_dtype = meta_dtype
        self.backend = backend
        self.fused_attention = fused_attention
        self.sink_tokens = sink_tokens
        self.cumulative_length = 0
        self.qkeys: Optional[QuantizedTensor] = None
        self.qvalues: Optional[QuantizedTensor] = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        d_v = value_states.shape[-1]
        if self.rotate_values:
            self.rot = hadamard(d_v, value_states.device)  # ValueError unless a power of two
        if d_v % self.group_size:  # (found here, at the prefill, not at the first flush a step later)
            fits = [g for g in (64, 32, 16, 8, 4) if g < self.group_size and d_v % g == 0 and all(
                g >= 32 // b for b in (self.key_bits, self.value_bits))]
            least = max(32 // b for b in (self.key_bits, self.value_bits))
            hint = (f"pass group_size={fits[0]}" if fits else
                    f"no power of two of at least {least} (what a 32-bit word of codes holds) divides it")
            raise ValueError(f"the value head size {d_v} is not a multiple of group_size {self.group_size} (values are "
                             f"quantized in groups of channels): {hint}")
        self.device = key_states.device
        self.dtype = key_states.dtype
        shape = (key_states.shape[0], key_states.shape[1], 0, key_states.shape[3])
        self.keys = key_states.new_empty(shape)
        self.values = value_states.new_empty((*shape[:3], value_states.shape[3]))
        self.is_initialized = True

    def rotate(self, v: torch.Tensor) -> torch.Tensor:
        """``v @ H`` in float32 (the Hadamard matrix is its own inverse: this also undoes the rotation)."""
        return v.float() @ self.rot

    # -- storage
    def flush(self) -> None:
        """Move whole groups of the oldest window tokens into the quantized part, keeping >= residual_length."""
        if not self.is_initialized:
            return
        s = self.sink_tokens
        n = (self.keys.shape[-2] - s - self.residual_length) // self.group_size * self.group_size
        if n <= 0:
            return
        k_old, v_old = self.keys[:, :, s : s + n], self.values[:, :, s : s + n]
        if self.rotate_values:  # quantize (and refine) the rotated values; dequantized() rotates back
            v_old = self.rotate(v_old)
        if self.qkeys is None:
            self._check_meta_range(k_old, v_old)
        kw = dict(meta_dtype=self.meta_dtype, meta_bits=self.meta_bits, backend=self.backend)
        if self.meta_bits == 8:
            kw["meta_round"] = self.meta_round
        kq = quantize_keys(k_old, self.key_bits, self.group_size, **kw)
        vq = quantize_values(v_old, self.value_bits, self.group_size, **kw)
        n_imp = int(round(self.important_ratio * n))
        if n_imp > 0:
            self._refine(k_old, v_old, kq, vq, n_imp)
        if self.mma_order:  # what the fused decode kernel reads fastest (kv_quant.to_mma_order)
            kq, vq = to_mma_order(kq), to_mma_order(vq, warps=self._warps_order)
        self.qkeys = _cat_quantized(self.qkeys, kq)
        self.qvalues = _cat_quantized(self.qvalues, vq)
        self.keys = torch.cat([self.keys[:, :, :s], self.keys[:, :, s + n :]], -2)
        self.values = torch.cat([self.values[:, :, :s], self.values[:, :, s + n :]], -2)

    def _check_meta_range(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Before the first flush of a bf16 or fp32 model's cache with fp16 scales and minimums: keys and values
        within fp16's range, or a ``ValueError`` (beyond it, a group's scale or minimum would be inf and the
        cache NaN, silently). One wait for the GPU, once a layer; later flushes are not checked. (An fp16
        model's states are within that range by construction, unless values are rotated: then in fp32.)"""
        if self.meta_dtype != torch.float16 or k.dtype == v.dtype == torch.float16:
            return
        top = max(float(k.abs().amax()), float(v.abs().amax()))
        if not top <= torch.finfo(torch.float16).max:
            raise ValueError(f"keys or values reach |x| = {top:g}, beyond the range of the fp16 scales and minimums "
                             "(65504): pass meta_dtype=torch.float32 to QuantizedKVCache")

    @property
    def mma_order(self) -> bool:
        """Whether the quantized part is stored in tensor-core operand order: with the fused attention on an
        fp16 model, no refinement codes and groups of at least 32 tokens (a flush then appends whole 32-token
        value blocks); the fused kernels then read no tile through shared memory. ``operand_order=True``
        picks, by shape: 4-bit caches of head size 64 or 128 keep their values for the kernel that gives
        each warp its own 16 tokens of a tile (``"warps"``, :func:`decode_attention.warps_kernel_takes`);
        other caches with heads of at least 128 channels the mma order of the 2D kernel (``"mma"``; at head
        size 64 it was measured slower than the KIVI-order kernel on an H100 with the queries in registers,
        and at 2 bits on a par on an H200); the rest KIVI's packing,
        which ``operand_order=False`` always keeps. ``"mma"`` and ``"warps"`` ask for one order."""
        if not (self.operand_order and self.fused_attention and self.important_ratio == 0 and self.is_initialized
                and self.dtype == torch.float16 and self.group_size >= 32
                and pick_backend(self.backend, self.keys) == "triton"):
            return False
        d = self.keys.shape[-1]
        if self._warps_order:
            return True
        if self.operand_order == "warps":
            return False
        return (d >= 128 or self.operand_order == "mma") and mma_kernel_takes(self.key_bits, self.value_bits, d,
                                                                              self.group_size)

    @property
    def _warps_order(self) -> bool:
        """Values in mma_w order (with :attr:`mma_order`): asked for, or picked by ``operand_order=True``."""
        return self.operand_order in (True, "warps") and warps_kernel_takes(
            self.key_bits, self.value_bits, self.keys.shape[-1], self.group_size, 1, self.meta_bits)

    # -- mixed precision (MiKV's idea with SnapKV's importance rule)
    def observe(self, query: torch.Tensor, scaling: Optional[float]) -> None:
        """Keep the last ``observation_window`` queries (called by the registered attention function)."""
        q = query.detach()
        self.obs_q = q if self.obs_q is None else torch.cat([self.obs_q, q], 2)
        self.obs_q = self.obs_q[:, :, -self.observation_window :]
        self.obs_scale = scaling

    def importance(self, start: int, n: int) -> torch.Tensor:
        """SnapKV's rule for the window-buffer tokens ``[start, start + n)``: attention they receive from the
        last ``observation_window`` queries (softmax over the whole cache, causal within the window, summed
        over the observation queries and the query heads of each kv head), smoothed by an average pool.
        Returns ``(B, H_kv, n)``."""
        if self.obs_q is None:
            raise RuntimeError("important_ratio > 0 needs the queries: set the model's attention to "
                               "engramdb.gpu.register_attention() (attn_implementation)")
        k_all, _ = self.dequantized()
        b, h, t, d = k_all.shape
        q = self.obs_q.float()
        w = q.shape[2]
        rep = q.shape[1] // h
        q = q.reshape(b, h, rep * w, d)
        scale = self.obs_scale if self.obs_scale is not None else d**-0.5
        scores = torch.einsum("bhqd,bhtd->bhqt", q, k_all.float()) * scale
        qpos = (t - w + torch.arange(w, device=q.device)).repeat(rep)  # query i of the window sits at t - w + i
        scores = scores.masked_fill(torch.arange(t, device=q.device)[None, :] > qpos[:, None], float("-inf"))
        attn = scores.softmax(-1).sum(2)  # (B, H, T)
        first = self.sink_tokens + (self.qkeys.shape[2] if self.qkeys is not None else 0) + (start - self.sink_tokens)
        imp = attn[..., first : first + n].reshape(b * h, 1, n)
        if self.pool_kernel > 1:
            imp = torch.nn.functional.avg_pool1d(imp, self.pool_kernel, 1, self.pool_kernel // 2,
                                                 count_include_pad=False)
        return imp.reshape(b, h, n)

    def _refine(self, k_old, v_old, kq, vq, n_imp) -> None:
        top = self.importance(self.sink_tokens, k_old.shape[-2]).topk(n_imp, -1).indices.sort(-1).values
        codes = []
        for x, q in ((k_old, kq), (v_old, vq)):
            sel = torch.gather(x, 2, top[..., None].expand(-1, -1, -1, x.shape[-1]))
            xhat = torch.gather(dequantize(q, torch.float32, backend=self.backend), 2,
                                top[..., None].expand(-1, -1, -1, x.shape[-1]))
            codes.append(refine_encode(sel, xhat, step_at(q, top), self.extra_bits))
        idx = (top + (self.qkeys.shape[2] if self.qkeys is not None else 0)).to(torch.int32)
        if self.ref_idx is None:
            self.ref_idx, self.ref_k, self.ref_v = idx, codes[0], codes[1]
        else:
            self.ref_idx = torch.cat([self.ref_idx, idx], 2)
            self.ref_k = torch.cat([self.ref_k, codes[0]], 2)
            self.ref_v = torch.cat([self.ref_v, codes[1]], 2)

    def _dequantize_refined(self, q: QuantizedTensor, codes: Optional[torch.Tensor], rotated: bool = False):
        if codes is None and not rotated:
            return dequantize(q, self.dtype, backend=self.backend)
        x = dequantize(q, torch.float32, backend=self.backend)
        if codes is not None:
            idx = self.ref_idx.long()[..., None].expand(-1, -1, -1, x.shape[-1])
            x = x.scatter_add(2, idx, refine_decode(codes, step_at(q, self.ref_idx), self.extra_bits))
        if rotated:
            x = self.rotate(x)
        return x.to(self.dtype)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole cache in the model's dtype and in token order: sinks, quantized part, window."""
        if self.qkeys is None:
            return self.keys, self.values
        s = self.sink_tokens
        k = self._dequantize_refined(self.qkeys, self.ref_k)
        v = self._dequantize_refined(self.qvalues, self.ref_v, self.rotate_values)
        return (torch.cat([self.keys[:, :, :s], k, self.keys[:, :, s:]], -2),
                torch.cat([self.values[:, :, :s], v, self.values[:, :, s:]], -2))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.flush()
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], -2)
        self.values = torch.cat([self.values, value_states], -2)
        if (self.fused_attention and key_states.shape[-2] == 1 and self.qkeys is not None and self.ref_idx is None
                and pick_backend(self.backend, key_states) == "triton"):
            marker = key_states.new_empty((key_states.shape[0], key_states.shape[1], 0, key_states.shape[3]))
            setattr(marker, _LAYER_ATTR, self)
            return marker, marker
        k, v = self.dequantized()
        if self.important_ratio > 0:  # the attention function records the queries for the importance rule
            k = k.view_as(k)  # a fresh tensor object: the attribute must not stick to the stored window
            setattr(k, _LAYER_ATTR, self)
        return k, v

    def nbytes(self) -> dict:
        """Bytes held, measured from the tensors: quantized part, window, and the token count of each."""
        q = (self.qkeys.nbytes() + self.qvalues.nbytes()) if self.qkeys is not None else 0
        if self.ref_idx is not None:  # mixed precision: token ids + refinement codes of the important tokens
            q += sum(t.numel() * t.element_size() for t in (self.ref_idx, self.ref_k, self.ref_v))
        r = 0
        if self.is_initialized:
            r = self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        return {"quantized": q, "quantized_tokens": self.qkeys.shape[2] if self.qkeys is not None else 0,
                "window": r, "window_tokens": self.keys.shape[-2] if self.is_initialized else 0}

    # -- the CacheLayerMixin interface
    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # (transformers 5.0-5.3 pass the query's cache positions instead of their count)
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # (get_max_length's name up to transformers 5.12, abstract there)
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.qkeys = self.qvalues = None
        self.obs_q = self.ref_idx = self.ref_k = self.ref_v = None
        self.is_initialized = False
        self.cumulative_length = 0

    def _apply_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.qkeys, self.qvalues = _index_quantized(self.qkeys, fn), _index_quantized(self.qvalues, fn)
        self.obs_q, self.ref_idx, self.ref_k, self.ref_v = (
            None if t is None else fn(t) for t in (self.obs_q, self.ref_idx, self.ref_k, self.ref_v))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_batch(lambda t: t[indices])

    @property
    def is_croppable(self) -> bool:
        """Whether :meth:`crop` takes the last tokens back exactly, as assisted decoding and prompt lookup need
        (transformers checks it before their first rollback): yes, except with mixed precision, whose record of
        the last queries (for the importance rule) cannot be wound back."""
        return self.important_ratio == 0

    def tokens_to_crop(self, length: int) -> int:
        """How many of the newest tokens ``crop(length)`` removes, or a ``ValueError`` if it cannot: ``length < 0``
        removes ``-length`` tokens (transformers' current form), ``length > 0`` keeps the first ``length`` (the form
        of earlier 5.x releases), 0 removes none.

        Only the full-precision window gives tokens back. A rollback removes some of the tokens of the last
        ``update``, and those are always there: ``update`` moves window tokens to the quantized part before it
        appends, never after. So after the crop the cache holds what it would hold had those tokens never come."""
        if isinstance(length, bool):
            raise TypeError("crop takes an int, got bool")
        length = operator.index(length)  # (a 0-d integer tensor too; anything else is a TypeError)
        n = -length if length < 0 else max(self.cumulative_length - length, 0) if length > 0 else 0
        if n == 0 or not self.is_initialized:
            return 0
        if not self.is_croppable:
            raise ValueError("a cache with mixed precision (important_ratio > 0) cannot be cropped: its record of "
                             "the last queries cannot be wound back")
        if n > self.cumulative_length:
            raise ValueError(f"cannot remove {n} tokens from a cache of {self.cumulative_length}")
        held = self.keys.shape[-2] - (self.sink_tokens if self.qkeys is not None else 0)
        if n > held:
            raise ValueError(f"cannot remove {n} tokens: only the newest {held} are held in full precision, the older "
                             "ones are quantized (a rollback of the last step's tokens always fits)")
        return n

    def crop(self, length: int) -> None:
        """Remove the newest tokens (see :meth:`tokens_to_crop` for ``length``); raises and changes nothing if
        it would reach into the quantized part."""
        n = self.tokens_to_crop(length)
        if n:
            self.keys, self.values = self.keys[:, :, :-n], self.values[:, :, :-n]
            self.cumulative_length -= n


def cache_kwargs(model, cache) -> dict:
    """The keyword that hands ``cache`` to ``model(...)`` / ``model.generate(...)``: transformers renamed
    ``past_key_values`` to ``cache`` during 5.x, and an unknown keyword is silently ignored by a model's
    forward, so pass ``**cache_kwargs(model, cache)`` to work with either."""
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


class QuantizedKVCache(Cache):
    """KIVI-quantized KV cache: ``model.generate(..., **cache_kwargs(model, QuantizedKVCache(model.config)))``
    (the keyword is ``cache`` in recent transformers, ``past_key_values`` before).

    ``bits`` (2 or 4; ``key_bits``/``value_bits`` override it per tensor), ``group_size`` (default 32),
    ``residual_length`` (recent tokens kept in full precision, a multiple of ``group_size``),
    ``sink_tokens`` (first tokens kept in full precision; 0 by default), ``meta_bits`` (16: fp16 scale and
    minimum per group; 8: 8-bit codes against an fp16 super-scale per token group and head, see
    :mod:`kv_quant`), ``meta_round`` (with ``meta_bits=8``: ``"cover"`` or ``"nearest"``, see
    :func:`kv_quant.quantize_keys`), ``rotate_values`` (quantize values after a Hadamard rotation of their
    channels, undone on the dequantized values or, in the fused path, on the attention output; the head size
    must be a power of two), ``operand_order`` (with ``fused_attention`` on an fp16 model: store the codes
    in tensor-core operand order, :func:`kv_quant.to_mma_order`, which the fused kernels read without
    staging tiles in shared memory; ``True`` picks the order by shape (see :attr:`QuantizedKVLayer.mma_order`),
    ``"mma"`` or ``"warps"`` ask for one, ``False`` keeps KIVI's packing and the general kernel).
    ``key_bits`` and ``value_bits`` may also be a sequence with one entry per layer (``config`` needed), e.g.
    4-bit keys in the few layers whose 2-bit keys err most (chosen on a calibration text).
    Without ``config`` the layers are created as the model first reaches them, all quantized.

    With ``config`` the cache has the layers transformers' ``DynamicCache`` would give the model, and quantizes its
    full-attention ones. Sliding-window layers (Mistral v0.1, Gemma 3's five in six, gpt-oss) keep their bounded
    window in full precision, as ``DynamicCache`` does: exact, never larger than the window, and attended by the
    model's SDPA rather than by dequantizing a whole history at every step. ``quantize_sliding=True`` quantizes
    them too, keeping every token (the mask then hides those outside the window). Layers without keys and values of
    their own (shared, linear attention) stay as transformers makes them.
    """

    def __init__(self, config=None, bits: int = 4, group_size: int = 32, residual_length: int = 32, *,
                 key_bits=None, value_bits=None,
                 meta_dtype: torch.dtype = torch.float16, backend: str = "auto", fused_attention: bool = False,
                 sink_tokens: int = 0, meta_bits: int = 16, important_ratio: float = 0.0, extra_bits: int = 2,
                 observation_window: int = 32, pool_kernel: int = 5, meta_round: str = "cover",
                 rotate_values: bool = False, operand_order=True, quantize_sliding: bool = False):
        per_layer = {name: list(b) for name, b in (("key_bits", key_bits), ("value_bits", value_bits))
                     if b is not None and not isinstance(b, int)}
        if per_layer:
            if config is None:
                raise ValueError("per-layer key_bits/value_bits need the model config (the layer count)")
            n_layers = config.get_text_config(decoder=True).num_hidden_layers
            for name, b in per_layer.items():
                if len(b) != n_layers:
                    raise ValueError(f"{name} has {len(b)} entries for {n_layers} layers")
            key_bits = per_layer.get("key_bits", [key_bits] * n_layers)
            value_bits = per_layer.get("value_bits", [value_bits] * n_layers)
            for i in range(n_layers):  # fail now on a bad entry, not at the first flush
                for b in (key_bits[i], value_bits[i]):
                    if b is not None and b not in (2, 4, 8):
                        raise ValueError(f"bits must be 2, 4 or 8, got {b} (layer {i})")
        kw = dict(meta_round=meta_round, rotate_values=rotate_values, bits=bits, group_size=group_size,
                  residual_length=residual_length, key_bits=key_bits,
                  value_bits=value_bits, meta_dtype=meta_dtype, backend=backend, fused_attention=fused_attention,
                  sink_tokens=sink_tokens, meta_bits=meta_bits, important_ratio=important_ratio,
                  extra_bits=extra_bits, observation_window=observation_window, pool_kernel=pool_kernel,
                  operand_order=operand_order)
        # fail now on a bad argument, not at a forward (per-layer bits were checked above)
        QuantizedKVLayer(**({**kw, "key_bits": None, "value_bits": None} if per_layer else kw))
        if config is None:
            super().__init__(layer_class_to_replicate=lambda: QuantizedKVLayer(**kw))
            return
        # the layers transformers gives this model (DynamicCache(config)); its full-attention ones quantized
        layers = DynamicCache(config=config).layers
        for i, layer in enumerate(layers):
            if type(layer) is DynamicLayer or (quantize_sliding and isinstance(layer, DynamicSlidingWindowLayer)):
                layers[i] = QuantizedKVLayer(**({**kw, "key_bits": key_bits[i], "value_bits": value_bits[i]}
                                                if per_layer else kw))
        super().__init__(layers=layers)

    @property
    def quantized_layers(self) -> list[QuantizedKVLayer]:
        return [layer for layer in self.layers if isinstance(layer, QuantizedKVLayer)]

    def flush(self) -> None:
        for layer in self.quantized_layers:
            layer.flush()

    def crop(self, length: int) -> None:
        """Remove the newest tokens from every layer (``length`` as in :meth:`QuantizedKVLayer.tokens_to_crop`).
        Every quantized layer is checked first, and transformers' own layers (sliding windows), which check as they
        go, are cropped before any quantized one: a crop that a layer cannot do raises with no layer changed."""
        for layer in self.quantized_layers:
            layer.tokens_to_crop(length)
        for layer in self.layers:
            if not isinstance(layer, QuantizedKVLayer):
                layer.crop(length)
        for layer in self.quantized_layers:
            layer.crop(length)

    def nbytes(self) -> list[dict]:
        """Per-layer byte counts measured from the stored tensors (see ``QuantizedKVLayer.nbytes``)."""
        return [layer.nbytes() if isinstance(layer, QuantizedKVLayer) else _plain_nbytes(layer) for layer in self.layers]


def _plain_nbytes(layer) -> dict:
    """``QuantizedKVLayer.nbytes``'s figures for a layer that transformers made (all of it counts as window)."""
    held = [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor)]
    return {"quantized": 0, "quantized_tokens": 0, "window": sum(t.numel() * t.element_size() for t in held),
            "window_tokens": held[0].shape[-2] if held else 0}


def kivi_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: Optional[float] = None, **kwargs):
    """Attention function for transformers' ``AttentionInterface`` (registered as :data:`ATTENTION_NAME`).

    It attends as SDPA does: logit soft-capping (Gemma 2) and learned attention sinks (``s_aux``, gpt-oss) raise a
    ``ValueError``, since neither the fused kernel nor SDPA applies them (SDPA itself would skip the sinks
    silently); a position bias takes the SDPA path."""
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:  # (two lookups on the decode path)
        unsupported = [name for name in ("softcap", "s_aux") if kwargs.get(name) is not None]
        raise ValueError(f"the {ATTENTION_NAME} attention does not apply {' or '.join(unsupported)}: use a model "
                         "without it, or keep the model's own attention (QuantizedKVCache without fused_attention works under any)")
    layer = getattr(key, _LAYER_ATTR, None)
    if layer is not None and layer.important_ratio > 0:
        layer.observe(query, scaling)
    if layer is None or key.shape[-2] > 0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    masked = False
    if attention_mask is not None:
        masked = not bool(attention_mask.all()) if attention_mask.dtype == torch.bool else bool((attention_mask != 0).any())
    if masked or kwargs.get("position_bias") is not None:
        k, v = layer.dequantized()
        return sdpa_attention_forward(module, query, k, v, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    v_res = layer.values
    if layer.rotate_values:  # out = P_q (V_q H) + P_w (V_w H) = (P V) H, so rotate the window, then out @ H
        v_res = layer.rotate(v_res).to(v_res.dtype)
    out = kivi_decode_attention(query, layer.qkeys, layer.qvalues, layer.keys, v_res, sm_scale=scaling,
                                backend=layer.backend)
    if layer.rotate_values:
        out = layer.rotate(out).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register :func:`kivi_attention_forward` with transformers; returns the name to pass as
    ``attn_implementation`` (or to ``model.set_attn_implementation``).

    The name is registered twice: as an attention function, and with SDPA's mask builder as its mask
    function. transformers builds no mask at all for an attention name that has no mask function (it takes
    it for a backend that needs none), and the padding of a padded batch would then be attended to. With
    SDPA's builder an unpadded batch still gets no mask (``None``: causal prefill, and the fused kernel at
    decode), and a padded one gets the boolean mask that the SDPA fallback applies."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, kivi_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME

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

Two ways to attend:

* default: ``update`` returns the dequantized cache (Triton dequantize kernel on CUDA, torch on
  the CPU) followed by the window, so any attention implementation works (this is what the CPU
  quality benchmark uses);
* ``fused_attention=True`` with the model's attention set to :data:`ATTENTION_NAME` (see
  :func:`register_attention`): a decode step returns a marker instead, and the attention function
  calls :func:`decode_attention.kivi_decode_attention`, which reads the packed cache directly.
  Prefill steps and masked (padded) batches fall back to dequantize + SDPA.

This follows the per-layer ``CacheLayerMixin`` interface of transformers 5.x (``update``,
``get_seq_length``, ``get_mask_sizes``, ``get_max_length``, ``reset``, ``reorder_cache``, ...).
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ._triton import pick_backend
from .decode_attention import kivi_decode_attention
from .kv_quant import QuantizedTensor, dequantize, quantize_keys, quantize_values

__all__ = ["QuantizedKVCache", "QuantizedKVLayer", "register_attention", "ATTENTION_NAME", "kivi_attention_forward"]

ATTENTION_NAME = "engramdb_kivi"
_LAYER_ATTR = "_engramdb_kivi_layer"


def _cat_quantized(a: Optional[QuantizedTensor], b: QuantizedTensor) -> QuantizedTensor:
    if a is None:
        return b
    # both layouts keep tokens on dim 2 (keys: token words; values: tokens), so groups append there
    return QuantizedTensor(
        torch.cat([a.packed, b.packed], 2), torch.cat([a.scale, b.scale], 2), torch.cat([a.minimum, b.minimum], 2),
        a.bits, a.group_size, a.axis, (a.shape[0], a.shape[1], a.shape[2] + b.shape[2], a.shape[3]),
    )


def _index_quantized(q: Optional[QuantizedTensor], fn) -> Optional[QuantizedTensor]:
    if q is None:
        return None
    packed, scale, minimum = fn(q.packed), fn(q.scale), fn(q.minimum)
    return QuantizedTensor(packed, scale, minimum, q.bits, q.group_size, q.axis, (packed.shape[0], *q.shape[1:]))


class QuantizedKVLayer(CacheLayerMixin):
    """One attention layer's KIVI cache (see the module docstring)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, bits: int = 4, group_size: int = 32, residual_length: int = 32, *,
                 key_bits: Optional[int] = None, value_bits: Optional[int] = None,
                 meta_dtype: torch.dtype = torch.float16, backend: str = "auto", fused_attention: bool = False,
                 sink_tokens: int = 0):
        super().__init__()
        if sink_tokens < 0:
            raise ValueError("sink_tokens must be >= 0")
        if residual_length % group_size:
            raise ValueError(f"residual_length ({residual_length}) must be a multiple of group_size ({group_size})")
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
        self.device = key_states.device
        self.dtype = key_states.dtype
        shape = (key_states.shape[0], key_states.shape[1], 0, key_states.shape[3])
        self.keys = key_states.new_empty(shape)
        self.values = value_states.new_empty((*shape[:3], value_states.shape[3]))
        self.is_initialized = True

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
        kq = quantize_keys(k_old, self.key_bits, self.group_size, meta_dtype=self.meta_dtype, backend=self.backend)
        vq = quantize_values(v_old, self.value_bits, self.group_size, meta_dtype=self.meta_dtype, backend=self.backend)
        self.qkeys = _cat_quantized(self.qkeys, kq)
        self.qvalues = _cat_quantized(self.qvalues, vq)
        self.keys = torch.cat([self.keys[:, :, :s], self.keys[:, :, s + n :]], -2)
        self.values = torch.cat([self.values[:, :, :s], self.values[:, :, s + n :]], -2)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole cache in the model's dtype and in token order: sinks, quantized part, window."""
        if self.qkeys is None:
            return self.keys, self.values
        s = self.sink_tokens
        k = dequantize(self.qkeys, self.dtype, backend=self.backend)
        v = dequantize(self.qvalues, self.dtype, backend=self.backend)
        return (torch.cat([self.keys[:, :, :s], k, self.keys[:, :, s:]], -2),
                torch.cat([self.values[:, :, :s], v, self.values[:, :, s:]], -2))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.flush()
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], -2)
        self.values = torch.cat([self.values, value_states], -2)
        if (self.fused_attention and key_states.shape[-2] == 1 and self.qkeys is not None
                and pick_backend(self.backend, key_states) == "triton"):
            marker = key_states.new_empty((key_states.shape[0], key_states.shape[1], 0, key_states.shape[3]))
            setattr(marker, _LAYER_ATTR, self)
            return marker, marker
        return self.dequantized()

    def nbytes(self) -> dict:
        """Bytes held, measured from the tensors: quantized part, window, and the token count of each."""
        q = (self.qkeys.nbytes() + self.qvalues.nbytes()) if self.qkeys is not None else 0
        r = 0
        if self.is_initialized:
            r = self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        return {"quantized": q, "quantized_tokens": self.qkeys.shape[2] if self.qkeys is not None else 0,
                "window": r, "window_tokens": self.keys.shape[-2] if self.is_initialized else 0}

    # -- the CacheLayerMixin interface
    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.qkeys = self.qvalues = None
        self.is_initialized = False
        self.cumulative_length = 0

    def _apply_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.qkeys, self.qvalues = _index_quantized(self.qkeys, fn), _index_quantized(self.qvalues, fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply_batch(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized cache cannot be cropped")


class QuantizedKVCache(Cache):
    """KIVI-quantized KV cache for ``model.generate(..., past_key_values=QuantizedKVCache(model.config))``.

    ``bits`` (2 or 4; ``key_bits``/``value_bits`` override it per tensor), ``group_size`` (default 32),
    ``residual_length`` (recent tokens kept in full precision, a multiple of ``group_size``),
    ``sink_tokens`` (first tokens kept in full precision; 0 by default).
    Without ``config`` the layers are created as the model first reaches them.
    """

    def __init__(self, config=None, bits: int = 4, group_size: int = 32, residual_length: int = 32, *,
                 key_bits: Optional[int] = None, value_bits: Optional[int] = None,
                 meta_dtype: torch.dtype = torch.float16, backend: str = "auto", fused_attention: bool = False,
                 sink_tokens: int = 0):
        kw = dict(bits=bits, group_size=group_size, residual_length=residual_length, key_bits=key_bits,
                  value_bits=value_bits, meta_dtype=meta_dtype, backend=backend, fused_attention=fused_attention,
                  sink_tokens=sink_tokens)
        QuantizedKVLayer(**kw)  # validate the arguments now rather than at the first forward
        if config is not None:
            n_layers = config.get_text_config(decoder=True).num_hidden_layers
            super().__init__(layers=[QuantizedKVLayer(**kw) for _ in range(n_layers)])
        else:
            super().__init__(layer_class_to_replicate=lambda: QuantizedKVLayer(**kw))

    def flush(self) -> None:
        for layer in self.layers:
            layer.flush()

    def nbytes(self) -> list[dict]:
        """Per-layer byte counts measured from the stored tensors (see ``QuantizedKVLayer.nbytes``)."""
        return [layer.nbytes() for layer in self.layers]


def kivi_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: Optional[float] = None, **kwargs):
    """Attention function for transformers' ``AttentionInterface`` (registered as :data:`ATTENTION_NAME`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = getattr(key, _LAYER_ATTR, None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    masked = False
    if attention_mask is not None:
        masked = not bool(attention_mask.all()) if attention_mask.dtype == torch.bool else bool((attention_mask != 0).any())
    if masked:
        k, v = layer.dequantized()
        return sdpa_attention_forward(module, query, k, v, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    out = kivi_decode_attention(query, layer.qkeys, layer.qvalues, layer.keys, layer.values, sm_scale=scaling,
                                backend=layer.backend)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> str:
    """Register :func:`kivi_attention_forward` with transformers; returns the name to pass as
    ``attn_implementation`` (or to ``model.set_attn_implementation``)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, kivi_attention_forward)
    return ATTENTION_NAME

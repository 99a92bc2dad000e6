"""engramdb.gpu: quantized KV cache and embedding-search kernels (Triton, with torch references).

An optional extra: ``pip install 'engramdb[gpu]'`` (torch, triton; transformers for the cache).
``import engramdb`` never imports this package. On a machine without CUDA every function runs its
torch reference, or the Triton kernel itself under ``TRITON_INTERPRET=1`` (set before import).
The transformers cache is imported lazily, so the kernels work without transformers installed.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("engramdb.gpu needs torch: pip install 'engramdb[gpu]'") from exc

from ._triton import HAS_TRITON, interpreting
from .decode_attention import kivi_decode_attention, kivi_decode_attention_ref
from .kv_quant import QuantizedTensor, dequantize, quantize_keys, quantize_values
from .search import BruteForceIndex, quantize_rows_int8, search_topk, search_topk_ref

_LAZY = {"QuantizedKVCache", "cache_kwargs", "QuantizedKVLayer", "register_attention", "kivi_attention_forward", "ATTENTION_NAME"}

__all__ = [
    "HAS_TRITON", "interpreting", "QuantizedTensor", "quantize_keys", "quantize_values", "dequantize",
    "kivi_decode_attention", "kivi_decode_attention_ref", "search_topk", "search_topk_ref", "BruteForceIndex",
    "quantize_rows_int8", *sorted(_LAZY),
]


def __getattr__(name):
    if name in _LAZY:
        from . import kv_cache

        return getattr(kv_cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

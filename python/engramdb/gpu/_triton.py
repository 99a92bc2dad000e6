"""Triton availability and backend choice, shared by the kernel modules.

Every public function in ``engramdb.gpu`` takes ``backend="auto" | "triton" | "torch"``.
``auto`` runs the Triton kernel when the tensors are on a CUDA device, or on the CPU when
``TRITON_INTERPRET=1`` was set before this package was imported (Triton reads the variable
when a kernel is decorated); otherwise it runs the torch reference, which is what the
CPU-only quality benchmark uses.
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional: without it every call takes the torch reference path
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Triton decides between compiling and interpreting when a kernel is decorated, i.e. when the kernel
# modules are imported (right after this one), so the choice is frozen here.
INTERPRET_AT_IMPORT = interpreting()


def triton_usable(t: torch.Tensor) -> bool:
    if not HAS_TRITON:
        return False
    if t.is_cuda:
        return True  # compiled, or interpreted (the interpreter copies CUDA tensors to the host)
    return t.device.type == "cpu" and INTERPRET_AT_IMPORT


def pick_backend(backend: str, t: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if triton_usable(t) else "torch"
    if backend == "triton" and not triton_usable(t):
        raise RuntimeError(
            "the Triton backend needs a CUDA tensor, or TRITON_INTERPRET=1 set before import for CPU tensors"
        )
    return backend


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers, on the host. (``triton.cdiv`` is a constexpr function: ~2.7 us a call
    through its wrapper on the 2-core CI machine, against ~0.1 us here; launch paths call it many times.)"""
    return -(-a // b)

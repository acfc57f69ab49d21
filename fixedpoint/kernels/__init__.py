"""Fused kernels for the solver inner loop: Triton on CUDA, their PyTorch twins everywhere.

``resolve(impl, tensor)`` picks the implementation: ``"auto"`` takes Triton for
CUDA tensors when it imports (fp32/fp16/bf16 data, under 2**31 features per sample), the host path for
CPU tensors (the twins, with the per-iteration bookkeeping and the solvers' small passes in NumPy: ``host``),
PyTorch otherwise
(never the slow CPU interpreter);
``"triton"`` insists and says why when it cannot run; ``"torch"`` is the twin.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor

from . import host, reference

__all__ = ["resolve", "check_impl", "default_for", "host", "reference", "IMPLS"]

IMPLS = ("auto", "torch", "triton")


def _triton_module() -> ModuleType | None:
    try:
        from . import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def check_impl(impl: str) -> None:
    """A ValueError naming the choices unless ``impl`` is one of IMPLS."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")


def default_for(x: Tensor) -> ModuleType:
    """The PyTorch kernels for data like ``x``: ``host`` on a CPU, ``reference`` elsewhere."""
    return host if x.device.type == "cpu" else reference


def resolve(impl: str, x: Tensor) -> ModuleType:
    """The kernel module (host, reference or triton_kernels) for ``impl`` and data like ``x``."""
    check_impl(impl)
    if impl == "torch":
        return reference
    supported = x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    features = x.numel() // x.shape[0] if x.dim() and x.shape[0] else x.numel()  # per sample, as the loop sees it
    if impl == "auto":  # Triton only where it is fast: CUDA
        module = _triton_module() if (x.is_cuda and supported) else None
        return module if module is not None and features <= module.MAX_FEATURES else default_for(x)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    runnable = supported and (x.is_cuda or (interpreted and x.device.type == "cpu"))
    module = _triton_module()
    if module is None:
        raise ValueError("impl='triton' needs the triton package: pip install 'fixedpoint[triton]'")
    if not runnable:
        raise ValueError(
            f"impl='triton' needs CUDA tensors of fp32/fp16/bf16 (or TRITON_INTERPRET=1 for the CPU interpreter); "
            f"got {x.dtype} on {x.device}"
        )
    if features > module.MAX_FEATURES:
        raise ValueError(f"impl='triton' takes at most {module.MAX_FEATURES} features per sample, got {features}")
    return module

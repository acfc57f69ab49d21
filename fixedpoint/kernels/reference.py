"""Pure-PyTorch twins of the fused kernels: same signatures, same results (the CPU path and the reference).

Shapes: iterates (B, D); Anderson histories (B, m, D). Accumulation in fp32
(fp64 for fp64 data), whatever the storage dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["residual", "anderson_write", "anderson_mix"]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def residual(x: Tensor, fx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """g = f(x) - x (B, D) in x's dtype, ||g||^2 (B,) and ||f(x)||^2 (B,) accumulated in fp32/fp64."""
    g = fx - x
    acc = _acc(x.dtype)
    norm = torch.linalg.vector_norm
    return g, norm(g, dim=1, dtype=acc).square(), norm(fx, dim=1, dtype=acc).square()


def anderson_write(F: Tensor, G: Tensor, slot: int, fx: Tensor, g: Tensor) -> Tensor:
    """Store f(x) and g in ring-buffer slot ``slot`` of F, G (in place); return the Gram row G g (B, m)."""
    F[:, slot] = fx
    G[:, slot] = g
    acc = _acc(g.dtype)
    return torch.bmm(G.to(acc), g.to(acc).unsqueeze(2)).squeeze(2)


def anderson_mix(
    F: Tensor, G: Tensor, alpha: Tensor, beta: float, frozen: Tensor | None, active: Tensor | None
) -> Tensor:
    """x = sum_i alpha_i (f(x_i) + (beta - 1) g_i) for active samples; stopped samples get ``frozen``.

    alpha (B, m) fp32/fp64, frozen (B, D) or None (every sample active), active (B,) bool.
    Returns (B, D) in F's dtype.
    """
    acc = alpha.dtype
    a = alpha.unsqueeze(1)  # (B, 1, m)
    x = torch.bmm(a, F.to(acc)).squeeze(1)
    if beta != 1.0:
        x = x + (beta - 1.0) * torch.bmm(a, G.to(acc)).squeeze(1)
    x = x.to(F.dtype)
    return x if frozen is None else torch.where(active[:, None], x, frozen)

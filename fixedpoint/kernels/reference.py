"""Pure-PyTorch twins of the fused kernels: same signatures, same results (the CPU path and the reference).

Shapes: iterates (B, D); Anderson and Broyden histories (B, m, D). Accumulation
in fp32 (fp64 for fp64 data), whatever the storage dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["residual", "picard_step", "anderson_write", "anderson_mix", "broyden_dots", "broyden_combine"]


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


def picard_step(x: Tensor, fx: Tensor, beta: float, frozen: Tensor | None, active: Tensor | None) -> Tensor:
    """x + beta (f(x) - x) (arithmetic in fp32/fp64) for active samples; stopped samples get ``frozen``.

    x, fx (B, D); frozen (B, D) or None (every sample active), active (B,) bool. Returns (B, D) in x's dtype.
    """
    acc = _acc(x.dtype)
    xa = x.to(acc)
    out = (xa + beta * (fx.to(acc) - xa)).to(x.dtype)
    return out if frozen is None else torch.where(active[:, None], out, frozen)


def broyden_dots(U: Tensor, V: Tensor, n: int, g: Tensor, dx: Tensor) -> Tensor:
    """The coefficients of Broyden's two applies, (B, 2, n) fp32/fp64: row 0 = V g, row 1 = U dx (first n slots)."""
    acc = _acc(g.dtype)
    vg = torch.bmm(V[:, :n].to(acc), g.to(acc).unsqueeze(2)).squeeze(2)
    udx = torch.bmm(U[:, :n].to(acc), dx.to(acc).unsqueeze(2)).squeeze(2)
    return torch.stack([vg, udx], dim=1)


def broyden_combine(
    U: Tensor, V: Tensor, n: int, coeff: Tensor, g: Tensor, dx: Tensor, hg: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Broyden's two applies and the dot products of its update, in one pass.

    With H = -I + sum_i u_i v_i^T over the first n slots (coefficients already masked):
    h_g = H g = -g + coeff[:, 0] U, v = H^T dx = -dx + coeff[:, 1] V, both (B, D) in g's dtype, and
    sums (B, 4) fp32/fp64: [dx . (h_g - hg), ||dx||^2, ||h_g - hg||^2, v . g].
    """
    acc = _acc(g.dtype)
    c = coeff.to(acc)
    h_g = (torch.bmm(c[:, :1], U[:, :n].to(acc)).squeeze(1) - g.to(acc)).to(g.dtype)
    v = (torch.bmm(c[:, 1:], V[:, :n].to(acc)).squeeze(1) - dx.to(acc)).to(g.dtype)
    dxa, h_dg = dx.to(acc), h_g.to(acc) - hg.to(acc)
    dots = [(dxa * h_dg).sum(1), dxa.square().sum(1), h_dg.square().sum(1), (v.to(acc) * g.to(acc)).sum(1)]
    sums = torch.stack(dots, dim=1)
    return h_g, v, sums

"""Problems with known fixed points, shared by the demo, the benchmarks and the tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["symmetric_matrix", "linear_deq"]


def symmetric_matrix(dim: int, low: float, high: float, *, seed: int = 0, dtype=torch.float64) -> Tensor:
    """A symmetric (dim, dim) matrix with eigenvalues spread evenly over [low, high]."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return ((q * torch.linspace(low, high, dim, dtype=torch.float64)) @ q.T).to(dtype)


def linear_deq(
    dim: int = 256,
    batch: int = 4,
    *,
    low: float = -0.5,
    high: float = 0.98,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor]:
    """z = W z + b with W symmetric, eigenvalues evenly over [low, high].

    Returns ``(f, b, z_star)``: the batched map (B, dim) -> (B, dim), the
    injections b (B, dim) and the closed-form fixed point z* = (I - W)^-1 b.
    The defaults are the benchmark problem of docs/solvers.md.
    """
    w = symmetric_matrix(dim, low, high, seed=seed)
    b = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - w, b.T).T
    w, b = w.to(dtype), b.to(dtype)
    return (lambda z: z @ w.T + b), b, z_star.to(dtype)

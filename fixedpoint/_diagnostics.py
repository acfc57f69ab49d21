"""Stability diagnostics: the spectral radius of f's Jacobian at a point, by power iteration on products J v."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._common import check_int, stat_dtype
from ._newton import _jvp_forward, _jvp_reverse
from ._tree import detach, flat_problem, is_structure

__all__ = ["spectral_radius"]


def spectral_radius(
    f: Callable[..., Tensor],
    z: Tensor,
    *,
    args: tuple | None = None,
    iters: int = 50,
    jvp: str = "forward",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Estimate the spectral radius of f's Jacobian at z, per sample: (B,), without forming the Jacobian.
    z may be a structured state (a tuple / list / dict of tensors): the Jacobian of the whole map.

    Power iteration: from a random v, each step takes w = J v (one Jacobian-vector product), records
    the growth ||w|| / ||v|| per sample and normalises. The estimate is the geometric mean of the growth
    over the last half of the steps (the first half lets the directions of smaller eigenvalues die out).
    For a dominant real eigenvalue or a dominant complex pair it tends to |lambda_max|, with an error that
    falls like |lambda_2 / lambda_1|^iters. Below 1, plain iteration converges near z (a DEQ is
    contractive there); the closer to 1, the slower; above 1 it diverges (Anderson and Newton may still
    converge).

    Args:
        f: the map, called as f(z, *args); samples must not interact (the Jacobian is block diagonal
            over the batch), as in a DEQ layer.
        z: (B, ...) the point, usually a solver's ``Solution.x``.
        args: f's further inputs (a tuple), or None.
        iters: power-iteration steps, at least 2 (one call of f each, plus one for "reverse").
        jvp: "forward" (forward-mode autograd, torch.func.jvp) or "reverse" (a vector-Jacobian product
            differentiated again: needs only f's backward).
        generator: the random start's generator (reproducible estimates).

    Returns (B,) in fp32 (fp64 for fp64 z). Runs without building a graph for the caller.
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    if is_structure(z):
        f, z, _ = flat_problem(f, detach(z), "z")
    if not isinstance(z, Tensor) or not z.is_floating_point() or z.ndim < 1 or z.numel() == 0:
        shown = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise TypeError(f"z must be a non-empty floating-point tensor (B, ...), got {shown}")
    if args is not None and not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of f's further inputs (or None), got {type(args).__name__}")
    iters = check_int("iters", iters, 2)
    if jvp not in ("forward", "reverse"):
        raise ValueError(f"jvp must be 'forward' or 'reverse', got {jvp!r}")
    fn = (lambda x: f(x, *args)) if args else f  # noqa: E731
    x = z.detach()
    product = _jvp_forward(fn, x, caller="spectral_radius") if jvp == "forward" else _jvp_reverse(fn, x)
    batch, acc = x.shape[0], stat_dtype(x.dtype)
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)  # (B, ...)
    v = v / torch.linalg.vector_norm(v.reshape(batch, -1), dim=1).clamp_min(1e-30).view(-1, *[1] * (x.ndim - 1))
    log_growth = torch.zeros(batch, dtype=acc, device=x.device)
    kept = iters - iters // 2  # the steps averaged: the last half
    for step in range(iters):
        w = product(v).detach()  # (B, ...)
        norm = torch.linalg.vector_norm(w.reshape(batch, -1), dim=1, dtype=acc)  # (B,): ||J v|| with ||v|| = 1
        if step >= iters - kept:
            log_growth += norm.log()  # -inf for a zero Jacobian (its radius is 0)
        scale = torch.where(norm > 0, norm, 1.0).to(w.dtype).view(-1, *[1] * (x.ndim - 1))
        v = torch.where((norm > 0).view(scale.shape), w / scale, v)  # a zero product keeps its direction
    return (log_growth / kept).exp()

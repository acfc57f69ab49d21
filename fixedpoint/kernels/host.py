"""The CPU path: the PyTorch twins, with the per-iteration bookkeeping on NumPy views of the same memory.

On a CPU the loop's per-sample accounting is some 30 small ops on (B,) vectors every iteration, and
each PyTorch op costs 2-4 us of dispatch against NumPy's 0.5-1 us: ``bookkeep`` takes ~80 us as
PyTorch ops and ~35 us here (B = 64), a fifth of a small DEQ's iteration. ``best_update`` copies rows
with ``np.copyto`` where the data has a NumPy dtype (fp16/32/64; bf16 stays with PyTorch).

Results are bit for bit the twins' (tests/test_kernels.py compares them on NaN, inf, zero and both
stopping measures): the square roots are PyTorch's (its float32 sqrt rounds differently from NumPy's
in the last bit), everything after them is IEEE arithmetic and comparisons, which agree.

``anderson_absorb`` (Anderson's history bookkeeping and its (B, m, m) fp64 coefficient solve, ~45 small
ops) runs here too, around the twin's own LAPACK call (``torch.linalg.solve_ex``, so the weights are bit
for bit the twin's), which it runs on one thread: with two threads on a loaded 2-core machine, the batched
LU of 32 6 x 6 systems took 0.06-12 ms (its threads wait for each other), on one thread ~20 us.
Every other kernel is reference's. ``resolve("auto", x)`` picks this module for CPU tensors; ``impl="torch"``
keeps the pure PyTorch twins.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from . import reference
from .groups import AndersonState, LoopBuffers, Pair, StopRule
from .reference import (  # noqa: F401  (the rest of the kernel set, as reference has it)
    CONVERGED,
    DIVERGED,
    KEEP,
    MAX_ITER,
    NONFINITE,
    READS_UNWRITTEN_SLOTS,
    REL_FLOOR,
    TAKE_NEW,
    TAKE_PREV,
    anderson_coefficients,
    anderson_mix,
    anderson_residual_write,
    anderson_write,
    broyden_combine,
    broyden_dots,
    broyden_finish,
    is_slot,
    picard_step,
    residual,
    solve_spd,
    written_slots,
)

__all__ = list(reference.__all__)

_NUMPY_DATA = (torch.float16, torch.float32, torch.float64)  # dtypes .numpy() can view
# the status codes as NumPy scalars: NumPy converting the IntEnum members costs ~1 us each (enum attribute lookups)
_CONVERGED, _MAX_ITER, _DIVERGED, _NONFINITE = (np.int64(code) for code in (CONVERGED, MAX_ITER, DIVERGED, NONFINITE))


def bookkeep(
    gsq: Tensor, fsq: Tensor, active: Tensor, loop: LoopBuffers, rule: StopRule, row: int | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``reference.bookkeep`` (same arguments, results and in-place updates) on NumPy views: CPU tensors only."""
    tol, divergence, max_iter, done = rule.tol, rule.divergence, rule.max_iter, loop.done
    gnorm_t = gsq.sqrt()  # PyTorch's rounding, as the twin
    gnorm, fnorm, g0 = gnorm_t.numpy(), fsq.sqrt().numpy(), loop.gnorm0.numpy()
    buffers = (loop.status, active, loop.best_res, loop.pending, loop.nsteps, loop.trace)
    st, act, best, pend, steps, tr = (t.numpy() for t in buffers)
    real = gnorm.dtype.type
    with np.errstate(all="ignore"):  # inf / inf and the like: NaN, as PyTorch gives, without a warning
        if rule.relative:  # near a fixed point at 0, relative to the start's residual instead (NaN-safe: compare)
            floor = real(REL_FLOOR) * g0
            res = gnorm / np.maximum(np.where(floor > fnorm, floor, fnorm), np.finfo(real).tiny)
        else:
            res = gnorm
        finite = np.isfinite(gnorm + fnorm)
        now = np.where(gnorm > real(divergence) * g0, _DIVERGED, _MAX_ITER) if divergence < math.inf else _MAX_ITER
        now = np.where(finite, np.where(res <= real(tol), _CONVERGED, now), _NONFINITE)
        improved = act & finite & ~(res >= best)  # also true where best is NaN
        np.copyto(st, now, where=act)
        np.copyto(best, res, where=improved)
        steps += act
        residuals = np.where(act, res, real(math.nan))
        new_active = st == _MAX_ITER
        if row is None:  # CUDA graphs only; kept for the same signature
            count = int(done)
            tr[min(count, max_iter)] = residuals
            done.add_(1)
            new_active &= count + 1 < max_iter
        else:
            tr[row] = residuals
        take = np.where(pend & ~improved, np.int8(TAKE_PREV), (improved & ~new_active).astype(np.int8))
        np.logical_and(improved, new_active, out=pend)
    counts = np.array([np.count_nonzero(new_active), np.count_nonzero(take)], dtype=np.int64)
    return gnorm_t, torch.from_numpy(new_active), torch.from_numpy(take), torch.from_numpy(counts)


def best_update(loop: LoopBuffers, new: Pair, prev: Pair, take: Tensor) -> None:
    """``reference.best_update`` with ``np.copyto`` where every tensor has a NumPy dtype (else the twin)."""
    tensors = (loop.best_x, loop.best_fx, *new, *prev)
    if any(t.dtype not in _NUMPY_DATA for t in tensors):
        return reference.best_update(loop, new, prev, take)
    bx, bfx, nx, nfx, px, pfx = (t.detach().numpy() for t in tensors)  # f's outputs may be leaves that require grad
    codes = take.numpy()[:, None]  # (B, 1)
    is_new, is_prev = codes == TAKE_NEW, codes == TAKE_PREV
    np.copyto(bx, px, where=is_prev)  # prev first: a row is one or the other, and new may be prev (finish)
    np.copyto(bfx, pfx, where=is_prev)
    np.copyto(bx, nx, where=is_new)
    np.copyto(bfx, nfx, where=is_new)


def _row_sums(a: np.ndarray) -> np.ndarray:
    """The row sums (B,) of a (B, m), added as PyTorch adds them (NumPy's order differs: other roundings)."""
    return torch.from_numpy(a).sum(dim=1).numpy()


@contextmanager
def _one_thread() -> Iterator[None]:
    """PyTorch's intra-op threads set to 1 inside (a no-op where it is 1 already)."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def anderson_absorb(
    state: AndersonState, gnorm: Tensor, *, growth: float | None, ridge: float, max_coeff: float, graph_safe: bool
) -> Tensor:
    """``reference.anderson_absorb`` (same arguments, in-place updates and weights alpha (B, m), bit for bit) on
    NumPy views, around the twin's own LAPACK call run on one thread. CPU tensors only."""
    if graph_safe:  # plain-op elimination, for graph capture: the twin's
        return reference.anderson_absorb(
            state, gnorm, growth=growth, ridge=ridge, max_coeff=max_coeff, graph_safe=graph_safe
        )
    gram, valid, newest, kept_gnorm, restarts = (
        t.numpy() for t in (state.gram, state.valid, state.newest, state.kept_gnorm, state.restarts)
    )
    gn, slot, relative = gnorm.numpy(), state.slot, state.relative
    real = gn.dtype.type
    batch, m = valid.shape
    blown = ~(gn <= real(growth) * kept_gnorm) if growth is not None else np.zeros(batch, dtype=bool)  # (B,)
    row = state.row.numpy()[:, 0] if relative else state.row.numpy()  # (B, m)
    kept = np.zeros_like(newest) if relative else newest  # what a restart keeps in the history
    valid &= ~blown[:, None] | kept
    gram[:, slot, :] = row
    gram[:, :, slot] = row
    valid[:, slot] = ~blown
    newest[:] = np.where(blown[:, None], newest, np.arange(m) == slot)
    np.copyto(kept_gnorm, gn, where=~blown)
    if relative:
        np.logical_not(blown, out=state.took.numpy())
    restarts += blown
    # the weights, as reference.anderson_coefficients
    with np.errstate(all="ignore"):  # non-finite samples: NaN weights, a restart, as the twin gives
        g = gram.astype(np.float64)
        scale = np.where(valid, 1.0 / np.sqrt(np.maximum(np.diagonal(g, axis1=1, axis2=2), 1e-300)), 0.0)  # (B, m)
        normed = scale[:, :, None] * g * scale[:, None, :]
        # unused slots: alpha 0; the ridge rounded to fp32 first, as the twin's torch.where of two scalars has it
        # (normed is a new C-contiguous product: the reshape is a view, and [:, ::m + 1] its diagonal)
        normed.reshape(batch, m * m)[:, :: m + 1] += np.where(valid, np.float32(ridge), np.float32(1.0))
        rhs = scale * state.row.numpy()[:, 1] if relative else scale
        with _one_thread():  # the twin's LAPACK call, bit for bit; on one thread (see the module's docstring)
            y = torch.linalg.solve_ex(torch.from_numpy(normed), torch.from_numpy(rhs))[0].numpy()
        w = scale * y
        if relative:
            alpha = (-w).astype(gram.dtype)
            coeff_size = 1 + 2 * _row_sums(np.abs(alpha))
            kept = np.zeros_like(newest)
        else:
            alpha = (w / _row_sums(w)[:, None]).astype(gram.dtype)
            coeff_size = _row_sums(np.abs(alpha))
            kept = newest
        ill = ~np.isfinite(coeff_size) | (coeff_size > max_coeff)  # (B,)
    valid &= ~ill[:, None] | kept
    restarts += ill
    return torch.from_numpy(np.where(ill[:, None], kept.astype(alpha.dtype), alpha))

"""The CPU path: the PyTorch twins, with the per-iteration bookkeeping and the solvers' small passes on NumPy
views of the same memory.

On a CPU the loop's per-sample accounting is some 30 small ops on (B,) vectors every iteration, and
each PyTorch op costs 2-4 us of dispatch against NumPy's 0.5-1 us (inside a solve, beside the rest of the
iteration, 3-5x that): ``bookkeep`` takes ~80 us as PyTorch ops and ~35 us here (B = 64), a fifth of a
small DEQ's iteration. ``best_update`` copies rows with ``np.copyto`` where the data has a NumPy dtype
(fp16/32/64; bf16 stays with PyTorch). These two are bit for bit the twins' (tests/test_host_kernels.py
compares them on NaN, inf, zero and both stopping measures): the square roots are PyTorch's (its float32
sqrt rounds differently from NumPy's in the last bit), everything after them is IEEE arithmetic and
comparisons, which agree.

Anderson's ``anderson_absorb`` (its history bookkeeping and the (B, m, m) fp64 coefficient solve) runs here
on every eager CPU solve (graph capture takes the twins), the solve by NumPy's LAPACK call: PyTorch's
``linalg.solve_ex`` took ~45 us of a tiny problem's iteration inside a solve, NumPy's ~20 (and it loops over
the batch on one thread, where two PyTorch threads on a loaded 2-core machine made the batched LU of 32
6 x 6 systems take 0.06-12 ms).
``anderson_residual_write`` and ``anderson_mix`` run here on small fp32/fp64 data (B x D <= SMALL_ELEMENTS),
where their dozen PyTorch ops cost more than their arithmetic; on larger data the twins' threaded ops.
Broyden's ``broyden_dots``, ``broyden_combine`` and ``broyden_finish`` run here on small data too (factors in
the data's dtype; a narrower history keeps the twins, which balance its terms).
These give the twins' results up to rounding (other sums' orders, another LAPACK build): Anderson's weights
agree to ~1e-13 relative in fp64 (at most an fp32 ulp), every flag and count exactly (but at a tie: a
coefficient sum or a Broyden denominator exactly at its bound may fall the other way). They took a tiny
iteration (B = 8, D = 64) from 330 to ~230 us (Anderson) and from 480 to ~355 us (Broyden). Every other
kernel is reference's.
``resolve("auto", x)`` picks this module for CPU tensors; ``impl="torch"`` keeps the pure PyTorch twins.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from . import reference
from .groups import AndersonState, BroydenApplies, BroydenState, BroydenStep, LoopBuffers, Pair, StopRule, evolve
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
    anderson_write,
    is_slot,
    picard_step,
    residual,
    solve_spd,
    written_slots,
)

__all__ = list(reference.__all__)

_NUMPY_DATA = (torch.float16, torch.float32, torch.float64)  # dtypes .numpy() can view
_NUMPY_HISTORY = (torch.float32, torch.float64)  # data whose stat dtype is its own: one dtype for data and sums
SMALL_ELEMENTS = 1 << 15  # (B, D) up to which the solvers' passes run on NumPy: below, a PyTorch op's dispatch
# and its in-context cost (~5 us each) outweigh the arithmetic; with 2 threads PyTorch's ops catch up by 1 << 16
# (docs/solvers.md, "Third pass"). Above, the twins.
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


def _numpy_pass(history: Tensor, dtype: torch.dtype) -> bool:
    """Whether a solver's pass over ``history`` (B, m, D) with data (or weights) of ``dtype`` runs on NumPy here:
    a small (B, D) (at most SMALL_ELEMENTS), fp32/fp64, the history in that same dtype (a narrower one, Anderson's
    difference form or Broyden's balanced terms, keeps the twins)."""
    batch, _, dim = history.shape
    return batch * dim <= SMALL_ELEMENTS and dtype in _NUMPY_HISTORY and history.dtype == dtype


def anderson_residual_write(state: AndersonState, x: Tensor, fx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``reference.anderson_residual_write`` (g = f(x) - x into the next slot of G, f(x) into F; ||g||^2,
    ||f(x)||^2 and the Gram row (B, m)) by NumPy on small data (``_numpy_pass``), else the twin's."""
    if not _numpy_pass(state.G, x.dtype):
        return reference.anderson_residual_write(state, x, fx)
    F, G, slot = state.F.numpy(), state.G.numpy(), state.slot
    xs, fxs = x.detach().numpy(), fx.detach().numpy()  # (B, D); f's outputs may be leaves that require grad
    g = np.subtract(fxs, xs, out=G[:, slot])  # (B, D), the slot's view
    F[:, slot] = fxs
    n = written_slots(state, 1)
    row = np.zeros(G.shape[:2], dtype=G.dtype)  # (B, m): 0 for the slots not written yet
    row[:, :n] = np.matmul(G[:, :n], g[:, :, None])[:, :, 0]
    gsq, fsq = np.einsum("ij,ij->i", g, g), np.einsum("ij,ij->i", fxs, fxs)  # (B,) each, in the data's dtype
    return torch.from_numpy(gsq), torch.from_numpy(fsq), torch.from_numpy(row)


def anderson_mix(state: AndersonState, beta: float, frozen: Tensor | None, active: Tensor | None) -> Tensor:
    """``reference.anderson_mix`` (x = sum_i alpha_i (f(x_i) + (beta - 1) g_i) for active samples, ``frozen``
    for the others) by NumPy on small data with weights in the history's dtype (``_numpy_pass``), else the twin's."""
    if not _numpy_pass(state.F, state.alpha.dtype):
        return reference.anderson_mix(state, beta, frozen, active)
    n = written_slots(state)  # the weights of the others are 0
    alpha = state.alpha.numpy()[:, None, :n]  # (B, 1, n)
    x = np.matmul(alpha, state.F.numpy()[:, :n])[:, 0]  # (B, D), rows at stride 1
    if beta != 1.0:
        x += (beta - 1.0) * np.matmul(alpha, state.G.numpy()[:, :n])[:, 0]
    if frozen is not None:
        x = np.where(active.numpy()[:, None], x, frozen.numpy())
    return torch.from_numpy(x)


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """y (B, m) with a y = b for a (B, m, m), b (B, m) in fp64: NumPy's LAPACK call (its loop over the batch
    runs on one thread); where it refuses a batch with an exactly singular matrix (equal pairs with a ridge too
    small to register: an exact zero pivot; NaN input gives NaN, no refusal), PyTorch's for the whole batch, which
    gives such samples non-finite weights (a restart) instead of raising (rare: the others' weights then come
    from PyTorch's LAPACK call, equal up to rounding)."""
    try:
        return np.linalg.solve(a, b[:, :, None])[:, :, 0]
    except np.linalg.LinAlgError:
        return torch.linalg.solve_ex(torch.from_numpy(a), torch.from_numpy(b))[0].numpy()


def anderson_absorb(
    state: AndersonState, gnorm: Tensor, *, growth: float | None, ridge: float, max_coeff: float, graph_safe: bool
) -> Tensor:
    """``reference.anderson_absorb`` (same arguments, in-place updates and weights alpha (B, m)) on NumPy views,
    the small fp64 systems by NumPy's LAPACK call (``_solve``): the weights equal the twin's up to rounding,
    every flag and count exactly but at ties with max_coeff. CPU tensors only."""
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
    row = state.row.numpy()[:, 0] if relative else state.row.numpy()  # (B, m)
    kept = np.zeros_like(newest) if relative else newest  # what a restart keeps in the history
    gram[:, slot, :] = row
    gram[:, :, slot] = row
    blown = ~(gn <= real(growth) * kept_gnorm) if growth is not None else None  # (B,)
    if blown is None or not blown.any():  # every new pair joins its history
        valid[:, slot] = True
        newest[:] = np.arange(m) == slot
        kept_gnorm[:] = gn
        if relative:
            state.took.numpy()[:] = True
    else:
        valid &= ~blown[:, None] | kept
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
        w = scale * _solve(normed, scale * state.row.numpy()[:, 1] if relative else scale)
        if relative:
            alpha = (-w).astype(gram.dtype)
            coeff_size = 1 + 2 * np.abs(alpha).sum(axis=1)
        else:
            alpha = (w / w.sum(axis=1, keepdims=True)).astype(gram.dtype)
            coeff_size = np.abs(alpha).sum(axis=1)
        ill = ~np.isfinite(coeff_size) | (coeff_size > max_coeff)  # (B,)
    if ill.any():
        valid &= ~ill[:, None] | kept
        restarts += ill
        alpha = np.where(ill[:, None], kept.astype(alpha.dtype), alpha)
    return torch.from_numpy(alpha)


def broyden_dots(state: BroydenState, new: BroydenStep) -> Tensor:
    """``reference.broyden_dots`` (V g and U dx, (B, 2, n) over the state's n = count slots) by NumPy on small
    data (``_numpy_pass``), else the twin's."""
    if not _numpy_pass(state.U, new.g.dtype):
        return reference.broyden_dots(state, new)
    n = state.count
    g, dx = new.g.detach().numpy(), new.dx.detach().numpy()  # (B, D)
    coeff = np.empty((g.shape[0], 2, n), dtype=g.dtype)  # (B, 2, n)
    np.matmul(state.V.numpy()[:, :n], g[:, :, None], out=coeff[:, 0, :, None])
    np.matmul(state.U.numpy()[:, :n], dx[:, :, None], out=coeff[:, 1, :, None])
    return torch.from_numpy(coeff)


def broyden_combine(state: BroydenState, new: BroydenStep, coeff: Tensor) -> BroydenApplies:
    """``reference.broyden_combine`` (h_g = H g, v = H^T dx (B, D) and the update's sums (B, 4)) by NumPy on
    small data (``_numpy_pass``), else the twin's."""
    if not _numpy_pass(state.U, new.g.dtype):
        return reference.broyden_combine(state, new, coeff)
    n = state.count
    g, dx, hg = new.g.detach().numpy(), new.dx.detach().numpy(), state.hg.numpy()  # (B, D)
    c = coeff.numpy() * state.alive.numpy()[:, None, :n]  # (B, 2, n): dead terms weigh 0
    h_g = np.matmul(c[:, :1], state.U.numpy()[:, :n])[:, 0] - g  # (B, D)
    v = np.matmul(c[:, 1:], state.V.numpy()[:, :n])[:, 0] - dx
    h_dg = h_g - hg
    sums = np.stack([np.einsum("ij,ij->i", a, b) for a, b in ((dx, h_dg), (dx, dx), (h_dg, h_dg), (v, g))], axis=1)
    return BroydenApplies(torch.from_numpy(h_g), torch.from_numpy(v), torch.from_numpy(sums))


def broyden_finish(state: BroydenState, new: BroydenStep, applies: BroydenApplies, *, growth: float) -> BroydenState:
    """``reference.broyden_finish`` (u, v into slot ``count``, H' g, a blown-up sample back at the state's
    iterate with H = -I; U, V, alive, restarts in place; the next state) by NumPy on small data
    (``_numpy_pass``), else the twin's."""
    if not _numpy_pass(state.U, new.x.dtype):
        return reference.broyden_finish(state, new, applies, growth=growth)
    x, g, gnorm, dx = (t.detach().numpy() for t in new)
    h_g, v, sums = (t.numpy() for t in applies)
    slot, alive = state.count, state.alive.numpy()
    x_old, g_old, hg_old, gnorm_old = (t.numpy() for t in (state.x, state.g, state.hg, state.gnorm))
    denom, dx_sq, h_dg_sq, v_g = sums[:, :4].T  # (B,) each; denom = dx^T H dg
    with np.errstate(all="ignore"):  # non-finite samples: not ok, as the twin has them
        ok = np.isfinite(denom) & (np.abs(denom) > 1e-12 * np.sqrt(dx_sq) * np.sqrt(h_dg_sq))
        u = (dx - (h_g - hg_old)) / np.where(ok, denom, 1)[:, None]  # (B, D)
        hg = h_g + np.where(ok, v_g, 0)[:, None] * u
        blown = ~(gnorm <= gnorm.dtype.type(growth) * gnorm_old)  # (B,)
    state.U.numpy()[:, slot] = u
    state.V.numpy()[:, slot] = v
    if blown.any():  # back at the state's iterate, with H = -I
        alive &= ~blown[:, None]
        state.restarts.numpy()[:] += blown
        keep = blown[:, None]
        x, g, gnorm, hg = (np.where(keep, x_old, x), np.where(keep, g_old, g), np.where(blown, gnorm_old, gnorm),
                           np.where(keep, -g_old, hg))  # fmt: skip
    alive[:, slot] = ok & ~blown
    return evolve(
        state, x=torch.from_numpy(x), g=torch.from_numpy(g), gnorm=torch.from_numpy(gnorm), hg=torch.from_numpy(hg),
        next_x=torch.from_numpy(x - hg), count=slot + 1,
    )  # fmt: skip

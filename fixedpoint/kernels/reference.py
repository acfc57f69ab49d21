"""Pure-PyTorch twins of the fused kernels: same signatures, same results (the reference; ``impl="torch"``).

Shapes: iterates (B, D); Anderson and Broyden histories (B, m, D). Accumulation
in fp32 (fp64 for fp64 data), whatever the storage dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._common import Status, stat_dtype
from .groups import AndersonState, BroydenApplies, BroydenState, BroydenStep, LoopBuffers, Pair, StopRule, evolve

__all__ = [
    "best_update",
    "bookkeep",
    "is_slot",
    "written_slots",
    "residual",
    "picard_step",
    "anderson_write",
    "anderson_residual_write",
    "anderson_absorb",
    "anderson_coefficients",
    "anderson_mix",
    "solve_spd",
    "broyden_dots",
    "broyden_combine",
    "broyden_finish",
    "balance",
]

CONVERGED, MAX_ITER, DIVERGED, NONFINITE = Status.CONVERGED, Status.MAX_ITER, Status.DIVERGED, Status.NONFINITE
KEEP, TAKE_NEW, TAKE_PREV = 0, 1, 2  # what best_update does per sample (bookkeep's ``take``)
REL_FLOOR = 1e-3  # stop="rel" divides by max(||f(x)||, REL_FLOOR * ||g(x0)||): a fixed point at 0 converges too
READS_UNWRITTEN_SLOTS = False  # Anderson's kernels read only the ring slots written so far (``written_slots``)


def residual(x: Tensor, fx: Tensor, g_out: Tensor | None) -> tuple[Tensor, Tensor]:
    """||f(x) - x||^2 and ||f(x)||^2 (B,) accumulated in fp32/fp64, from x, fx (B, D).

    g_out: a (B, D) buffer (any row stride: a history slot works) that receives g = f(x) - x
    in its own dtype, or None when nobody reads g (nothing is written).
    """
    acc = stat_dtype(x.dtype)
    if g_out is None:
        g = fx - x
    elif g_out.dtype == fx.dtype:  # straight into the buffer: no (B, D) temporary and copy
        g = torch.sub(fx, x, out=g_out)
    else:
        g = g_out.copy_(fx - x)  # the norm of g as stored
    norm = torch.linalg.vector_norm
    return norm(g, dim=1, dtype=acc).square(), norm(fx, dim=1, dtype=acc).square()


def anderson_write(state: AndersonState, fx: Tensor, g: Tensor) -> Tensor:
    """Store f(x) and g in the state's next ring slot (in place); return the Gram row G g (B, m).

    g may already be that slot of G (the residual pass wrote it there): then it is not copied.
    """
    F, G, slot = state.F, state.G, state.slot
    F[:, slot] = fx
    if not is_slot(G, slot, g):
        G[:, slot] = g
    acc, n = stat_dtype(g.dtype), written_slots(state, 1)
    # as (1, D) x (D, n) per sample: on a CPU 14x faster than G g (32 x 6 x 9408) and closer to the fp64 products
    return _padded(torch.bmm(g.to(acc).unsqueeze(1), G[:, :n].to(acc).transpose(1, 2)).squeeze(1), G.shape[1])


def anderson_residual_write(state: AndersonState, x: Tensor, fx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The residual pass and the history write in one: g = f(x) - x goes straight into the state's next slot
    of G and f(x) into F (in place). Returns ||g||^2, ||f(x)||^2 (B,) and the Gram row G g (B, m).

    Relative (a low-precision history in difference form): the slot receives the differences from the
    state's kept pair, g - g_kept into G and f(x) - f_kept into F (g and g_kept = f_kept - x_kept in x's
    dtype), and the row is (B, 2, m): G dg with dg as stored, and G g."""
    if not state.relative:
        g = state.G[:, state.slot]
        gsq, fsq = residual(x, fx, g)
        return gsq, fsq, anderson_write(state, fx, g)
    F, G, slot, acc = state.F, state.G, state.slot, stat_dtype(x.dtype)
    g = torch.empty_like(x)
    gsq, fsq = residual(x, fx, g)
    G[:, slot] = g - (state.f_kept - state.x_kept)
    F[:, slot] = fx - state.f_kept
    history = G[:, : written_slots(state, 1)].to(acc)  # (B, n, D)
    rows = torch.bmm(torch.stack([history[:, slot], g.to(acc)], dim=1), history.transpose(1, 2))  # (B, 2, n)
    return gsq, fsq, _padded(rows, G.shape[1])


def written_slots(state: AndersonState, new: int = 0) -> int:
    """How many ring slots hold this solve's pairs (relative: differences), ``new`` being written now included:
    the ring fills in order from slot 0, so they are the first ones. The twins read only those, so a fresh
    history needs no zero fill (``READS_UNWRITTEN_SLOTS``) and the first m iterations read fewer slots."""
    return min(state.count + new, state.F.shape[1])


def _padded(rows: Tensor, m: int) -> Tensor:
    """Gram rows (..., n) over the written slots as (..., m), zeros for the slots not written yet."""
    return rows if rows.shape[-1] == m else torch.nn.functional.pad(rows, (0, m - rows.shape[-1]))


def is_slot(history: Tensor, slot: int, t: Tensor) -> bool:
    """Whether ``t`` is the view history[:, slot] (same memory, shape and strides)."""
    view = history[:, slot]
    return t.data_ptr() == view.data_ptr() and t.shape == view.shape and t.stride() == view.stride()


def anderson_mix(state: AndersonState, beta: float, frozen: Tensor | None, active: Tensor | None) -> Tensor:
    """x = sum_i alpha_i (f(x_i) + (beta - 1) g_i) over the state's history with its weights ``alpha`` (B, m)
    fp32/fp64, for active samples; stopped samples get ``frozen``.

    frozen (B, D) or None (every sample active), active (B,) bool. Returns (B, D) in F's dtype.

    Relative: first the kept pair takes the last evaluated one where ``took`` (active samples, in place),
    then x = f_kept + (beta - 1) g_kept + the same sums over the differences; (B, D) in x_kept's dtype.
    """
    n = written_slots(state)  # the weights of the others are 0
    F, G, alpha = state.F[:, :n], state.G[:, :n], state.alpha
    acc = alpha.dtype
    a = alpha[:, :n].unsqueeze(1)  # (B, 1, n)
    x = torch.bmm(a, F.to(acc)).squeeze(1)
    if beta != 1.0:
        x = x + (beta - 1.0) * torch.bmm(a, G.to(acc)).squeeze(1)
    if state.relative:
        take = state.took if frozen is None else state.took & active
        torch.where(take[:, None], state.x_new, state.x_kept, out=state.x_kept)
        torch.where(take[:, None], state.f_new, state.f_kept, out=state.f_kept)
        xk, fk = state.x_kept.to(acc), state.f_kept.to(acc)
        x = (fk + (beta - 1.0) * (fk - xk) + x).to(state.x_kept.dtype)
    else:
        x = x.to(F.dtype)
    return x if frozen is None else torch.where(active[:, None], x, frozen)


def picard_step(x: Tensor, fx: Tensor, beta: float, frozen: Tensor | None, active: Tensor | None) -> Tensor:
    """x + beta (f(x) - x) (arithmetic in fp32/fp64; f(x) itself when beta = 1) for active samples;
    stopped samples get ``frozen``.

    x, fx (B, D); frozen (B, D) or None (every sample active), active (B,) bool. Returns (B, D) in x's dtype.
    """
    if beta == 1.0:  # plain iteration: x <- f(x), nothing to compute
        out = fx
    else:
        acc = stat_dtype(x.dtype)
        xa = x.to(acc)
        out = (xa + beta * (fx.to(acc) - xa)).to(x.dtype)
    return out if frozen is None else torch.where(active[:, None], out, frozen)


def broyden_dots(state: BroydenState, new: BroydenStep) -> Tensor:
    """The coefficients of Broyden's two applies, (B, 2, n) fp32/fp64 over the state's n = count slots:
    row 0 = V g, row 1 = U dx."""
    n, acc = state.count, stat_dtype(new.g.dtype)
    # as (1, D) x (D, n) per sample, as Anderson's Gram row: on a CPU 10x faster than V g at (64, 20, 128)
    vg = torch.bmm(new.g.to(acc).unsqueeze(1), state.V[:, :n].to(acc).transpose(1, 2)).squeeze(1)
    udx = torch.bmm(new.dx.to(acc).unsqueeze(1), state.U[:, :n].to(acc).transpose(1, 2)).squeeze(1)
    return torch.stack([vg, udx], dim=1)


def broyden_combine(state: BroydenState, new: BroydenStep, coeff: Tensor) -> BroydenApplies:
    """Broyden's two applies and the dot products of its update, in one pass.

    With H = -I + sum_i alive_i u_i v_i^T over the state's first n = count slots (coeff (B, 2, n) from
    ``broyden_dots``): h_g = H g = -g + coeff[:, 0] U, v = H^T dx = -dx + coeff[:, 1] V, both (B, D) in
    g's dtype, and sums (B, 4) fp32/fp64: [dx . (h_g - hg), ||dx||^2, ||h_g - hg||^2, v . g] with the
    state's hg; with U, V narrower than g (a low-precision history) (B, 6): also ||v||^2 and
    ||dx - (h_g - hg)||^2, the norms ``balance`` needs.
    """
    n, g, dx = state.count, new.g, new.dx
    acc = stat_dtype(g.dtype)
    c = coeff.to(acc) * state.alive[:, None, :n]
    h_g = (torch.bmm(c[:, :1], state.U[:, :n].to(acc)).squeeze(1) - g.to(acc)).to(g.dtype)
    v = (torch.bmm(c[:, 1:], state.V[:, :n].to(acc)).squeeze(1) - dx.to(acc)).to(g.dtype)
    dxa, h_dg = dx.to(acc), h_g.to(acc) - state.hg.to(acc)
    dots = [(dxa * h_dg).sum(1), dxa.square().sum(1), h_dg.square().sum(1), (v.to(acc) * g.to(acc)).sum(1)]
    if state.U.dtype != g.dtype:
        dots += [v.to(acc).square().sum(1), (dxa - h_dg).square().sum(1)]
    return BroydenApplies(h_g, v, torch.stack(dots, dim=1))


def bookkeep(
    gsq: Tensor, fsq: Tensor, active: Tensor, loop: LoopBuffers, rule: StopRule, row: int | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One iteration's per-sample accounting after the residual pass (the solver loop's epilogue).

    gsq, fsq (B,): ||f(x) - x||^2, ||f(x)||^2 (fp32/fp64); active (B,) bool: samples this iteration moved.
    In the ``loop``'s buffers, in place: status of the active samples (by ``rule``), best_res where they
    improved, nsteps += active, and one row of trace: this iteration's residuals, NaN for inactive
    samples. That row is ``row``, or with ``row`` None (CUDA graphs) min(done, max_iter), done += 1, and
    samples stop at max_iter.

    The best pair is copied lazily: ``pending`` marks samples whose best pair is the newest evaluated one
    and not copied yet. ``take`` (B,) int8 says what ``best_update`` copies: TAKE_NEW when a sample
    stopped at its best, TAKE_PREV when a pending sample did not improve (its best is the previous pair),
    KEEP otherwise. So nothing is copied while the residual keeps falling.
    Returns ||g|| (B,), the new active (B,) bool, take (B,) int8 and counts (2,) [active, samples to copy].
    """
    gnorm0, status, best_res, pending, nsteps, trace, done = (
        loop.gnorm0, loop.status, loop.best_res, loop.pending, loop.nsteps, loop.trace, loop.done
    )
    tol, divergence, max_iter = rule.tol, rule.divergence, rule.max_iter
    gnorm, fnorm = gsq.sqrt(), fsq.sqrt()
    if rule.relative:  # near a fixed point at 0, relative to the start's residual instead (NaN-safe: compare)
        floor = REL_FLOOR * gnorm0
        res = gnorm / torch.where(floor > fnorm, floor, fnorm).clamp_min(torch.finfo(gsq.dtype).tiny)
    else:
        res = gnorm
    finite = torch.isfinite(gnorm + fnorm)
    now = torch.where(gnorm > divergence * gnorm0, DIVERGED, MAX_ITER) if divergence < math.inf else MAX_ITER
    now = torch.where(finite, torch.where(res <= tol, CONVERGED, now), NONFINITE)
    improved = active & finite & ~(res >= best_res)  # also true where best_res is NaN
    torch.where(active, now, status, out=status)
    torch.where(improved, res, best_res, out=best_res)
    nsteps.add_(active)
    residuals = torch.where(active, res, torch.nan)
    new_active = status == MAX_ITER
    if row is None:
        trace.index_copy_(0, done.clamp(max=max_iter).view(1), residuals[None])
        done.add_(1)
        new_active &= done < max_iter
    else:
        trace[row] = residuals
    # bools compare as 0 < 1: a > b is a & ~b (fewer small ops: this runs every iteration on the CPU path)
    take = torch.where(pending > improved, TAKE_PREV, (improved > new_active).to(torch.int8))  # TAKE_NEW == 1
    torch.logical_and(improved, new_active, out=pending)
    return gnorm, new_active, take, torch.stack([new_active.sum(), torch.count_nonzero(take)])


def solve_spd(a: Tensor, b: Tensor) -> Tensor:
    """Solve a y = b for small symmetric positive definite a (B, m, m), b (B, m): Gaussian elimination.

    No pivoting (a is SPD), plain batched tensor ops: no library call, nothing that could
    sync with the host, so it can run inside a CUDA graph. Non-finite input gives non-finite y.
    """
    a, b = a.clone(), b.clone()
    m = a.shape[-1]
    for k in range(m - 1):
        factor = a[:, k + 1 :, k] / a[:, k, k, None]  # (B, m-k-1)
        a[:, k + 1 :, k:] -= factor[:, :, None] * a[:, k, None, k:]
        b[:, k + 1 :] -= factor * b[:, k, None]
    y = torch.empty_like(b)
    for k in reversed(range(m)):
        y[:, k] = (b[:, k] - (a[:, k, k + 1 :] * y[:, k + 1 :]).sum(dim=1)) / a[:, k, k]
    return y


def anderson_coefficients(state: AndersonState, *, ridge: float, max_coeff: float, graph_safe: bool) -> Tensor:
    """Anderson's mixing weights alpha (B, m) in the Gram matrix's dtype: sum 1, minimising
    ||sum_i alpha_i g_i|| over the state's history.

    From the state's gram (B, m, m) G G^T, valid (B, m) (slots in the current history) and newest
    (B, m) one-hot. The Gram matrix is scaled to unit diagonal before the ridge is added (so the ridge
    is relative), and solved in fp64 (``graph_safe``: by plain elimination, else LAPACK/cuSOLVER without
    an error-check sync). A sample whose ||alpha||_1 is not finite or exceeds ``max_coeff`` restarts:
    alpha = newest, and in place its history shrinks to the newest pair (valid) and restarts counts it.

    Relative (difference form): gamma minimises ||g_kept - sum_i gamma_i dg_i|| (right-hand side: the
    row's projections, state.row[:, 1]) and the weights are -gamma, not normalised; the weights of the pairs
    they stand for have ||alpha||_1 <= 1 + 2 ||gamma||_1, which is what ``max_coeff`` bounds. An ill sample
    drops every difference (its newest pair is the kept one, outside the history) and gets weights 0.
    """
    gram, valid, newest = state.gram, state.valid, state.newest
    g = gram.double()
    diag = torch.diagonal(g, dim1=1, dim2=2)  # (B, m)
    scale = torch.where(valid, diag.clamp_min(1e-300).rsqrt(), 0.0)  # (B, m)
    normed = scale[:, :, None] * g * scale[:, None, :]
    normed.diagonal(dim1=1, dim2=2).add_(torch.where(valid, ridge, 1.0))  # unused slots: alpha 0
    rhs = scale * state.row[:, 1].double() if state.relative else scale
    y = solve_spd(normed, rhs) if graph_safe else torch.linalg.solve_ex(normed, rhs)[0]
    w = scale * y
    if state.relative:
        alpha = (-w).to(gram.dtype)
        coeff_size = 1 + 2 * alpha.abs().sum(dim=1)
        newest = torch.zeros_like(newest)  # what a restart keeps in the history: nothing
    else:
        alpha = (w / w.sum(dim=1, keepdim=True)).to(gram.dtype)
        coeff_size = alpha.abs().sum(dim=1)
    ill = ~torch.isfinite(coeff_size) | (coeff_size > max_coeff)  # (B,)
    valid &= ~ill[:, None] | newest
    state.restarts.add_(ill.long())
    return torch.where(ill[:, None], newest.to(alpha.dtype), alpha)


def best_update(loop: LoopBuffers, new: Pair, prev: Pair, take: Tensor) -> None:
    """In place: the loop's best_x, best_fx (B, D) take the ``new`` pair where take == TAKE_NEW and the
    ``prev`` pair where take == TAKE_PREV; other samples are not touched (take (B,) int8, from ``bookkeep``)."""
    best_x, best_fx = loop.best_x, loop.best_fx
    is_new, is_prev = (take == TAKE_NEW)[:, None], (take == TAKE_PREV)[:, None]
    torch.where(is_new, new.x, torch.where(is_prev, prev.x, best_x), out=best_x)
    torch.where(is_new, new.fx, torch.where(is_prev, prev.fx, best_fx), out=best_fx)


def anderson_absorb(
    state: AndersonState, gnorm: Tensor, *, growth: float | None, ridge: float, max_coeff: float, graph_safe: bool
) -> Tensor:
    """Anderson's history bookkeeping after a write to the state's slot, in place, and the next step's
    mixing weights alpha (B, m) (``anderson_coefficients`` with ridge, max_coeff, graph_safe).

    The state's row (B, m), the new pair's Gram row, is stored as row and column ``slot`` of gram.
    A sample whose ||g|| (gnorm, (B,)) exceeds ``growth`` times the last kept one (kept_gnorm)
    blew up: its history shrinks to its newest pair, the new pair is not kept, restarts += 1.
    Otherwise the new pair joins the history (valid), becomes ``newest`` and kept_gnorm = gnorm.
    growth None: every new pair is kept.

    Relative: the row is state.row[:, 0]; a blown-up sample drops every difference (its kept pair stays),
    and ``took`` says per sample whether the new pair is the kept one from now on (``anderson_mix`` moves it).
    """
    gram, valid, newest, kept_gnorm, slot = state.gram, state.valid, state.newest, state.kept_gnorm, state.slot
    blown = ~(gnorm <= growth * kept_gnorm) if growth is not None else torch.zeros_like(valid[:, 0])  # (B,)
    row, kept = (state.row[:, 0], torch.zeros_like(newest)) if state.relative else (state.row, newest)
    valid &= ~blown[:, None] | kept  # a blown-up sample keeps its newest pair (relative: the kept pair, outside)
    gram[:, slot, :] = row.to(gram.dtype)
    gram[:, :, slot] = row.to(gram.dtype)
    valid[:, slot] = ~blown
    in_slot = torch.arange(valid.shape[1], device=valid.device) == slot  # (m,)
    torch.where(blown[:, None], newest, in_slot, out=newest)
    torch.where(blown, kept_gnorm, gnorm, out=kept_gnorm)
    if state.relative:
        torch.logical_not(blown, out=state.took)
    state.restarts.add_(blown)
    return anderson_coefficients(state, ridge=ridge, max_coeff=max_coeff, graph_safe=graph_safe)


def balance(denom: Tensor, v_sq: Tensor, r_sq: Tensor, ok: Tensor) -> Tensor:
    """The scale s (B,) with which a history narrower than the iterate stores a Broyden term u v^T: (s u, v / s).

    The two factors drift apart: u = r / (dx . H dg) with r = dx - H dg, v = H^T dx; on the benchmark ||v||
    reached 1e4 and overflowed fp16 (65504) within 35 iterations while ||u|| stayed below 1. From the
    update's sums ||v||^2 and ||r||^2: s = sqrt(||v|| |dx . H dg| / ||r||) makes ||s u|| = ||v / s||.
    1 where the term is not kept (``ok`` False), r = 0 (u = 0) or s is not a positive finite number.
    """
    s = (v_sq.sqrt() * denom.abs() / torch.where(r_sq > 0, r_sq, 1.0).sqrt()).sqrt()
    return torch.where(ok & (r_sq > 0) & (s > 0) & torch.isfinite(s), s, 1.0)


def broyden_finish(state: BroydenState, new: BroydenStep, applies: BroydenApplies, *, growth: float) -> BroydenState:
    """The rest of a good-Broyden update after ``broyden_combine``, in one pass; the next state.

    u = (dx - H dg) / (dx . H dg) with H dg = h_g - hg (the state's) (skipped, ok = False, when that
    denominator is not finite or negligible); u and v go to slot ``count`` of U, V; the next step
    H' g = h_g + u (v . g). A sample whose ||g|| exceeds ``growth`` times the state's blew up: its
    terms die (alive), it stays at the state's (x, g) with H = -I, restarts += 1.
    In place: U, V (the slot), alive, restarts. The next state keeps x, g, ||g|| and H g, its next
    iterate x - H g (from H g as stored), and count + 1.
    """
    x, g, gnorm, dx = new
    h_g, v, sums = applies
    slot, x_old, g_old, hg_old, gnorm_old, alive = state.count, state.x, state.g, state.hg, state.gnorm, state.alive
    acc = stat_dtype(x.dtype)
    denom, dx_sq, h_dg_sq, v_g = sums.to(acc).unbind(1)[:4]  # (B,) each; denom = dx^T H dg
    ok = torch.isfinite(denom) & (denom.abs() > 1e-12 * dx_sq.sqrt() * h_dg_sq.sqrt())  # no fp32 overflow
    u = (dx.to(acc) - (h_g.to(acc) - hg_old.to(acc))) / torch.where(ok, denom, 1.0)[:, None]
    hg = h_g.to(acc) + torch.where(ok, v_g, 0.0)[:, None] * u
    blown = ~(gnorm <= growth * gnorm_old)  # (B,)
    alive &= ~blown[:, None]
    if state.U.dtype == x.dtype:
        state.U[:, slot] = u.to(state.U.dtype)
        state.V[:, slot] = v
    else:  # a narrower history stores s u and v / s, of about the same size (fp16's range)
        s = balance(denom, sums[:, 4].to(acc), sums[:, 5].to(acc), ok)[:, None]
        state.U[:, slot] = (u * s).to(state.U.dtype)
        state.V[:, slot] = (v.to(acc) / s).to(state.V.dtype)
    alive[:, slot] = ok & ~blown
    state.restarts.add_(blown)
    keep = blown[:, None]
    x_keep, hg_keep = torch.where(keep, x_old, x), torch.where(keep, -g_old, hg.to(x.dtype))
    step = x_keep - hg_keep  # half precision: computed in fp32 and rounded once, as the kernel does
    return evolve(
        state, x=x_keep, g=torch.where(keep, g_old, g), gnorm=torch.where(blown, gnorm_old, gnorm), hg=hg_keep,
        next_x=step, count=slot + 1,
    )  # fmt: skip

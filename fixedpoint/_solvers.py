"""Picard, Anderson and Broyden as small solver objects run by the shared loop.

Newton-Krylov lives in ``_newton.py``. Every public function is a thin wrapper:
it checks its own options, builds the solver object and hands it to
:func:`fixedpoint._solve.solve`. Tensors are flat: (B, D).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from . import _tree
from . import kernels as kernel_modules
from ._common import check_int, check_interval, check_memory, check_positive, row_norms, stat_dtype
from ._solve import Solution, Solver, solve
from .kernels.groups import AndersonState, BroydenState, BroydenStep, evolve

__all__ = ["picard", "anderson", "broyden"]

Map = Callable[..., Tensor]  # f(z, *args) -> same shape as z


_DOC_PARTS = {
    "{common}": """f: maps a batch (B, ...) to the same shape; the first dimension is the batch.
        x0: (B, ...) floating-point start. Low precision stays low precision in
            storage; norms and small solves run in fp32 (fp64 for fp64 input).
        args: f's further inputs, a tuple: f is called as f(z, *args). None
            (default): f(z).
        tol: stop a sample when its residual is <= tol.
        max_iter: at most this many iterations (one call of f each, for Newton
            plus its Jacobian-vector products).
        stop: "rel" measures ||f(x) - x|| / max(||f(x)||, 1e-3 ||f(x0) - x0||)
            (relative, and near a fixed point at 0 relative to the start's
            residual), "abs" measures ||f(x) - x||.
        divergence: a sample whose ||f(x) - x|| exceeds this factor times its
            start is stopped as DIVERGED (None disables the check).
        check_every: ask the device whether any sample is still iterating only
            every k iterations. With k >= 2 the answer is copied to the host
            without waiting and read one iteration later, so the host never
            stalls the device (up to k extra calls of f once all have stopped;
            the results are the same). 1 syncs once per iteration, exactly.""",
    "{graph}": """graph: False, or "solver" on CUDA: f runs eagerly (any f) and everything
            else in an iteration is one CUDA graph launch; convergence is checked
            as without graphs. The graphs are kept for later solves with the
            same solver, options and shapes, whatever f: the 4 most recently
            used, holding their buffers (GPU memory);
            fixedpoint.clear_graph_cache() drops them. The trace is then a
            static (max_iter + 1, B) buffer (without graphs it grows with the
            iterations run). To capture f as well, compile it:
            step = torch.compile(f, mode="reduce-overhead") and solve
            lambda z: step(z).clone() (CUDA graph trees overwrite an
            output at the next call, and the loop keeps earlier ones; graph=True, which
            captured f with the loop, was removed in 0.2).""",
    "{impl}": """impl: "auto" (fused Triton kernels on CUDA when triton imports, PyTorch
            otherwise), "torch", or "triton" (an error where it cannot run).""",
}


def _common_doc(fn):
    """Fill the shared argument descriptions into a solver's docstring."""
    for placeholder, text in _DOC_PARTS.items():
        fn.__doc__ = fn.__doc__.replace(placeholder, text)
    return fn


def _check_beta(name: str, value: float | str, high: float | None) -> float | str:
    """``value`` as a float in (0, high] (None: any positive finite number), or "auto"; a ValueError
    naming it otherwise."""
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"{name} must be a number or 'auto', got {value!r}")
        return value
    return check_positive(name, value) if high is None else check_interval(name, value, 0.0, high)


def auto_beta(x: Tensor, gnorm: Tensor) -> Tensor:
    """beta="auto": scipy's scale of the first step (scipy.optimize's anderson, broyden1), per sample.

    0.5 max(||x0||, 1) / ||f(x0) - x0|| (B,) in gnorm's dtype, from the start x (B, D) and its residual's
    norm gnorm (B,); 1 where that is not a positive finite number (a start at its fixed point, a
    non-finite start). The step x + beta (f(x) - x) then moves each sample by at most half its own size.
    """
    beta = 0.5 * row_norms(x, gnorm.dtype).clamp_min(1.0) / gnorm
    return torch.where(torch.isfinite(beta) & (beta > 0), beta, 1.0)


def _damped(x: Tensor, fx: Tensor, beta: Tensor) -> Tensor:
    """x + beta (f(x) - x) with a per-sample beta (B,), in fp32/fp64, stored in x's dtype."""
    acc = beta.dtype
    xa = x.to(acc)
    return (xa + beta[:, None] * (fx.to(acc) - xa)).to(x.dtype)


def _flat(x0: object) -> object:
    """x0 as the loop will see it: a structured state's flat (B, D) stand-in (its leaves' dtype and device);
    anything else as it is (bad x0 is left for solve()'s own, clearer, message)."""
    if _tree.is_structure(x0):
        with suppress(TypeError, ValueError):
            return _tree.Layout.of(x0, "x0").stand_in()
    return x0


def _flat_dtype(x0: object) -> torch.dtype | None:
    """The dtype the loop will iterate in (a structured state: its leaves'), or None for x0 that solve() refuses."""
    x0 = _flat(x0)
    return x0.dtype if isinstance(x0, Tensor) and x0.is_floating_point() else None


def check_history_dtype(history_dtype: object, dtype: torch.dtype | None) -> torch.dtype | None:
    """history_dtype for iterates of ``dtype``: None where it is None or ``dtype`` itself (the history in the
    iterate's dtype), else a floating dtype narrower than ``dtype`` (fp32 under fp64; fp16 and bf16 under
    either). A TypeError for a non-dtype, a ValueError naming it for any other dtype (an integer dtype, one
    as wide as the iterate's or wider)."""
    if history_dtype is None:
        return None
    if not isinstance(history_dtype, torch.dtype):
        raise TypeError(f"history_dtype must be a torch.dtype or None, got {history_dtype!r} "
                        f"({type(history_dtype).__name__})")  # fmt: skip
    if not history_dtype.is_floating_point:
        raise ValueError(f"history_dtype must be a floating-point dtype (torch.bfloat16, torch.float16), "
                         f"got {history_dtype}")  # fmt: skip
    if dtype is None or history_dtype == dtype:
        return None
    if history_dtype.itemsize >= dtype.itemsize:
        raise ValueError(f"history_dtype must be narrower than the iterate's dtype {dtype} (or None), got "
                         f"{history_dtype}: it is meant to save memory traffic")  # fmt: skip
    return history_dtype


def _kernels(impl: str, x0: Tensor) -> ModuleType:
    """The kernel module for ``impl`` and data like x0 (a structured state: its flat (B, D) form); bad x0 is left
    for the loop's own checks (a clearer error). (With graphs, ``solve`` swaps the CPU host path for the twins.)"""
    x0 = _flat(x0)
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        kernel_modules.check_impl(impl)
        return kernel_modules.reference
    return kernel_modules.resolve(impl, x0)


# ----------------------------------------------------------------------------- Picard


@dataclass(frozen=True)
class _PicardState:
    x: Tensor  # (B, D)
    fx: Tensor  # (B, D) f(x)
    beta: Tensor | None = None  # (B,) per-sample beta (beta="auto", from the start), else the solver's scalar


@dataclass(frozen=True)
class Picard(Solver):
    """x <- x + beta (f(x) - x), in one fused step that also keeps stopped samples (``freezes``).

    beta="auto": a per-sample beta from the start (``auto_beta``); the step kernel, which takes a scalar,
    is given the damped image x + beta (f(x) - x) with beta 1."""

    beta: float | str = 1.0
    kernels: ModuleType = kernel_modules.reference  # the fused damped step
    freezes = True  # the step kernel keeps stopped samples in the same pass
    period = 1  # iterations after which the solver's Python-side state repeats (graph capture)

    def init(self, x, fx, g, gnorm):
        return _PicardState(x, fx, auto_beta(x, gnorm) if self.beta == "auto" else None)

    def residual(self, state, x, fx):
        return (None, *self.kernels.residual(x, fx, None), state)  # g is never read: not written

    def step(self, fn, state, active, frozen):
        if state.beta is None:
            return self.kernels.picard_step(state.x, state.fx, self.beta, frozen, active), state
        return self.kernels.picard_step(state.x, _damped(state.x, state.fx, state.beta), 1.0, frozen, active), state

    def update(self, state, x, fx, g, gnorm):
        return _PicardState(x, fx, state.beta)


@_common_doc
def picard(
    f: Map,
    x0: Tensor,
    *,
    args: tuple | None = None,
    tol: float = 1e-4,
    max_iter: int = 50,
    stop: str = "rel",
    divergence: float | None = 1e6,
    check_every: int = 1,
    graph: bool | str = False,
    beta: float | str = 1.0,
    impl: str = "auto",
) -> Solution:
    """Plain fixed-point iteration x <- (1 - beta) x + beta f(x).

    Args:
        {common}
        {graph}
        beta: damping in (0, 2]; 1 is undamped iteration. "auto": per sample,
            scipy's scale 0.5 max(||x0||, 1) / ||f(x0) - x0||, fixed for the
            solve (for badly scaled maps x + F(x); it may exceed 2).
        {impl}
    """
    beta = _check_beta("beta", beta, 2.0)
    kern = _kernels(impl, x0)
    return solve(Picard(beta, kernels=kern), f, x0, args=args, tol=tol, max_iter=max_iter, stop=stop,
                 divergence=divergence, check_every=check_every, graph=graph)  # fmt: skip


# ----------------------------------------------------------------------------- Anderson


@dataclass(frozen=True)
class Anderson(Solver):
    """Type-II Anderson mixing over a ring of m pairs; its own residual pass writes into the history."""

    m: int = 5
    beta: float | str = 1.0  # "auto": per sample, the history's images are x_i + beta g_i and the mixing's beta 1
    ridge: float = 1e-6
    max_coeff: float = 1e4
    growth: float = 1e2
    kernels: ModuleType = kernel_modules.reference  # residual + history write + Gram row in one pass, fused mixing
    graph_safe: bool = False  # small solves by plain tensor ops (no library call that could sync): graph capture
    history_dtype: torch.dtype | None = None  # narrower than the iterates: the difference form (check_history_dtype)
    freezes = True  # the mixing kernel keeps stopped samples in the same pass

    @property
    def relative(self) -> bool:
        """The difference form: m - 1 differences in history_dtype beside the newest kept pair (m = 1: no history)."""
        return self.history_dtype is not None and self.m > 1

    @property
    def slots(self) -> int:
        """The history's ring slots: m pairs, or relative m - 1 differences of consecutive pairs."""
        return self.m - 1 if self.relative else self.m

    @property
    def period(self) -> int:
        """Iterations after which the Python-side state (the ring slot) repeats: graph capture replays this many."""
        return self.slots

    def init(self, x, fx, g, gnorm):
        batch, dim = x.shape
        sdt, m = stat_dtype(x.dtype), self.slots
        hdt = self.history_dtype if self.relative else x.dtype
        if self.relative:
            check_history_dtype(hdt, x.dtype)  # a Solver built by hand: the same rule as anderson()'s
            if self.beta == "auto":
                raise ValueError("beta='auto' is not supported with a history_dtype narrower than x0's dtype")
        kept = 2 * dim * x.element_size() if self.relative else 0  # the kept pair
        nbytes = batch * (m * (2 * dim * hdt.itemsize + m * sdt.itemsize) + kept)  # F, G; the Gram matrix
        check_memory("m", self.m, nbytes, f"the ({batch}, m, {dim}) history and its Gram matrix", x.device)
        vectors = {}
        if self.relative:
            took = torch.empty(batch, dtype=torch.bool, device=x.device)
            vectors = dict(x_kept=torch.empty_like(x), f_kept=torch.empty_like(x), took=took)
        # a fresh history: zeros only for kernels that read the slots not written yet (Triton's; the twins do not)
        history = x.new_zeros if getattr(self.kernels, "READS_UNWRITTEN_SLOTS", True) else x.new_empty
        state = AndersonState(
            F=history(batch, m, dim, dtype=hdt),
            G=history(batch, m, dim, dtype=hdt),
            gram=x.new_empty(batch, m, m, dtype=sdt),
            valid=torch.empty(batch, m, dtype=torch.bool, device=x.device),
            newest=torch.empty(batch, m, dtype=torch.bool, device=x.device),
            kept_gnorm=torch.empty_like(gnorm),
            restarts=torch.empty(batch, dtype=torch.long, device=x.device),
            row=x.new_empty(batch, 2, m, dtype=sdt) if self.relative else x.new_empty(batch, m, dtype=sdt),
            beta=torch.empty_like(gnorm) if self.beta == "auto" else None,
            **vectors,
        )
        return self._start(state, x, fx, g, gnorm)

    def reinit(self, state: AndersonState, x, fx, g, gnorm) -> AndersonState:
        """``init`` into the tensors of ``state`` (a kept graph session's buffers): no new history.

        The history is zeroed, not just marked invalid: the session's graphs read every slot, and a slot the
        mixing weighs by 0 must not hold a NaN from an earlier solve (0 * NaN is NaN)."""
        state.F.zero_()
        state.G.zero_()
        return self._start(state, x, fx, g, gnorm)

    def _start(self, state: AndersonState, x, fx, g, gnorm) -> AndersonState:
        """The state's bookkeeping reset and the start pair taken (its history zeroed or never read before it is
        written). Relative: the start is the kept pair, no difference yet, weights 0 (the first step is x + beta g)."""
        for t in (state.gram, state.valid, state.newest, state.restarts):
            t.zero_()
        state.kept_gnorm.copy_(gnorm)
        if state.relative:
            state.x_kept.copy_(x)
            state.f_kept.copy_(fx)
            state.took.zero_()
            alpha = state.row.new_zeros(state.row.shape[0], state.row.shape[2])
            return evolve(state, count=0, alpha=alpha, x_new=x, f_new=fx)
        if state.beta is not None:
            state.beta.copy_(auto_beta(x, gnorm))
        state = evolve(state, count=0)
        state.row.copy_(self.kernels.anderson_write(state, fx, g))  # the start pair into slot 0
        self._damp_image(state)
        return self._absorb(state, gnorm, growth=None)

    @staticmethod
    def _damp_image(state: AndersonState) -> None:
        """With a per-sample beta: the image just written to the next slot, f(x) = x + g, becomes
        x + beta g in place, so that the mixing kernel (a scalar beta, 1) gives sum_i alpha_i (x_i + beta g_i).
        The weights do not change: they come from G alone."""
        if state.beta is not None:  # (not with a relative state: refused)
            F, G, slot, acc = state.F, state.G, state.slot, state.beta.dtype
            F[:, slot] = (F[:, slot].to(acc) + (state.beta - 1)[:, None] * G[:, slot].to(acc)).to(F.dtype)

    def _absorb(self, state: AndersonState, gnorm, growth: float | None) -> AndersonState:
        """The pair just written to the next slot joins the history: its Gram row and column, and the
        bookkeeping in place (a step that multiplied ||g|| by more than ``growth`` restarts the history
        from the pair it came from; None: never); and the next step's mixing weights, in the same launch
        (ill-conditioned samples restart, in place: valid, restarts, with a damped step)."""
        alpha = self.kernels.anderson_absorb(
            state, gnorm, growth=growth, ridge=self.ridge, max_coeff=self.max_coeff, graph_safe=self.graph_safe
        )
        return evolve(state, count=state.count + 1, alpha=alpha)

    def residual(self, state, x, fx):
        # one pass: g = f(x) - x straight into the next slot, f(x) beside it, the norms and the new Gram row
        gsq, fsq, row = self.kernels.anderson_residual_write(state, x, fx)
        self._damp_image(state)
        g = None if state.relative else state.G[:, state.slot]  # relative: the slot holds a difference; unread
        return g, gsq, fsq, evolve(state, row=row)

    def step(self, fn, state, active, frozen):
        # x = sum_i alpha_i (x_i + beta g_i) = sum_i alpha_i f(x_i) + (beta - 1) sum_i alpha_i g_i
        return self.kernels.anderson_mix(state, 1.0 if state.beta is not None else self.beta, frozen, active), state

    def update(self, state, x, fx, g, gnorm):
        # the pair is already in its slot (residual); a step that blew the residual up restarts from
        # the pair it came from (needs m > 1). Relative: the mixing makes (x, f(x)) the kept pair unless so.
        if state.relative:
            state = evolve(state, x_new=x, f_new=fx)
        return self._absorb(state, gnorm, growth=self.growth if self.m > 1 else None)


@_common_doc
def anderson(
    f: Map,
    x0: Tensor,
    *,
    args: tuple | None = None,
    tol: float = 1e-4,
    max_iter: int = 50,
    stop: str = "rel",
    divergence: float | None = 1e6,
    check_every: int = 1,
    graph: bool | str = False,
    m: int = 5,
    beta: float | str = 1.0,
    ridge: float = 1e-6,
    max_coeff: float = 1e4,
    growth: float = 1e2,
    history_dtype: torch.dtype | None = None,
    impl: str = "auto",
) -> Solution:
    """Anderson acceleration (type II) with a relative ridge and restarts.

    Each step mixes the last ``m`` pairs: x <- sum_i alpha_i (x_i + beta g_i)
    with g_i = f(x_i) - x_i and alpha minimising ||sum_i alpha_i g_i|| subject
    to sum_i alpha_i = 1.

    Args:
        {common}
        {graph}
        m: history size (pairs kept).
        beta: mixing/damping in (0, 2]; 1 mixes the images f(x_i) only.
            "auto": per sample, scipy's scale 0.5 max(||x0||, 1) / ||f(x0) - x0||,
            fixed for the solve (for badly scaled maps x + F(x); it may exceed 2).
        ridge: Tikhonov term added to the Gram matrix after scaling it to unit
            diagonal, i.e. relative to the residuals' size.
        max_coeff: restart a sample's history when ||alpha||_1 exceeds this
            (the small system is ill-conditioned).
        growth: restart a sample's history when a step multiplies ||f(x) - x||
            by more than this.
        history_dtype: None (the iterate's dtype), or a narrower one (torch.bfloat16,
            torch.float16; fp32 under fp64) to store the history in: then it holds
            the m - 1 differences of consecutive pairs, which shrink as the solve
            converges, beside the newest pair in x0's dtype, and every sum
            accumulates in fp32 (docs/solvers.md, "Low-precision history"). Not with
            beta="auto".
        {impl}
    """
    m = check_int("m", m, 1)
    beta = _check_beta("beta", beta, 2.0)
    ridge = check_positive("ridge", ridge)
    max_coeff = check_positive("max_coeff", max_coeff)
    growth = check_positive("growth", growth)
    history_dtype = check_history_dtype(history_dtype, _flat_dtype(x0))
    if history_dtype is not None and beta == "auto" and m > 1:
        raise ValueError(f"beta='auto' is not supported with history_dtype={history_dtype}; give a number")
    kern = _kernels(impl, x0)
    solver = Anderson(m=m, beta=beta, ridge=ridge, max_coeff=max_coeff, growth=growth, kernels=kern,
                      graph_safe=bool(graph), history_dtype=history_dtype)  # fmt: skip
    return solve(solver, f, x0, args=args, tol=tol, max_iter=max_iter, stop=stop, divergence=divergence,
                 check_every=check_every, graph=graph)  # fmt: skip


# ----------------------------------------------------------------------------- Broyden


def _reduce_rank(U: Tensor, V: Tensor, alive: Tensor, rank: int) -> None:
    """Replace sum_i alive_i u_i v_i^T, stored as (B, m, D) factors, by its best rank-``rank`` part, in place.

    Broyden rank reduction (van de Rotten and Verduyn Lunel 2005): the SVD of the small
    core R_u R_v^T of thin QR factorisations U^T = Q_u R_u, V^T = Q_v R_v. The R factors
    come from the m x m Gram matrices (R = sqrt(L) E^T from G = E L E^T), so the (B, m, D)
    factors are read twice (Gram matrices, new factors) and never decomposed: tall QRs
    on a GPU cost ~100x more. The Gram matrices are formed in fp64 (exact for fp32 data);
    directions whose squared singular value is below 1e-15 of the largest (their
    rounding level) are dropped.
    """
    sdt = stat_dtype(U.dtype)

    def factors(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """W (B, m, D) -> W in sdt, R (B, m, m) with W W^T = R^T R, and R's pseudo-inverse core E L^-1/2."""
        W = torch.nan_to_num(W.to(sdt), nan=0.0, posinf=0.0, neginf=0.0)  # stopped samples
        Wd = W.double()  # an exact Gram matrix: its eigenvalues are squared singular values
        lam, E = torch.linalg.eigh(torch.bmm(Wd, Wd.transpose(1, 2)))  # (B, m), (B, m, m)
        keep = lam > 1e-15 * lam[:, -1:].clamp_min(1e-300)
        root = torch.where(keep, lam, 0.0).sqrt()
        return W, root[:, :, None] * E.transpose(1, 2), E * torch.where(keep, root, 1.0).reciprocal()[:, None, :]

    Uw, Ru, Pu = factors(U * alive[:, :, None])
    Vw, Rv, Pv = factors(V)
    p, sv, wt = torch.linalg.svd(Ru @ Rv.transpose(1, 2))  # core (B, m, m)
    Tu = Pu @ (p[:, :, :rank] * sv[:, None, :rank])  # (B, m, rank): new U^T = U^T Tu
    Tv = Pv @ wt.transpose(1, 2)[:, :, :rank]
    U.zero_()
    V.zero_()
    U[:, :rank] = torch.bmm(Tu.transpose(1, 2).to(sdt), Uw).to(U.dtype)
    V[:, :rank] = torch.bmm(Tv.transpose(1, 2).to(sdt), Vw).to(V.dtype)
    alive[:] = torch.arange(alive.shape[1], device=alive.device) < rank


@dataclass(frozen=True)
class Broyden(Solver):
    """Limited-memory good Broyden on g(x) = f(x) - x; the next iterate comes out of the update."""

    m: int = 20
    growth: float = 1e2
    beta: float | str = 1.0  # H0 = -beta I ("auto": per sample), as Broyden on beta (f(x) - x) with H0 = -I
    kernels: ModuleType = kernel_modules.reference  # the two applies of an update in two fused passes
    history_dtype: torch.dtype | None = None  # U, V's dtype if narrower than the iterates (check_history_dtype)

    def init(self, x, fx, g, gnorm):
        batch, dim = x.shape
        hdt = check_history_dtype(self.history_dtype, x.dtype) or x.dtype
        check_memory("m", self.m, 2 * batch * self.m * dim * hdt.itemsize, f"the ({batch}, m, {dim}) factors U, V",
                     x.device)  # fmt: skip
        zeros = x.new_zeros(batch, self.m, dim, dtype=hdt)
        alive = torch.zeros(batch, self.m, dtype=torch.bool, device=x.device)
        restarts = torch.zeros(batch, dtype=torch.long, device=x.device)
        scale = None
        if self.beta != 1.0:  # good Broyden on s g from H0 = -I takes the steps of Broyden on g from H0 = -s I
            scale = auto_beta(x, gnorm) if self.beta == "auto" else torch.full_like(gnorm, self.beta)
            g, gnorm = self._scaled(g, scale), gnorm * scale
        hg = -g  # H = -I
        return BroydenState(U=zeros, V=zeros.clone(), alive=alive, restarts=restarts, x=x, g=g, gnorm=gnorm, hg=hg,
                            next_x=x - hg, scale=scale)  # fmt: skip

    @staticmethod
    def _shrink(state: BroydenState, blown: Tensor) -> BroydenState:
        """Samples whose step from H = -scale I blew up (``blown`` (B,) bool; broyden_finish put them back
        at their last iterate with H = -scale I, so the same step would blow up again) restart with a
        quarter of their scale: a backtracking of the first step, as scipy's line search would do."""
        shrink = torch.where(blown, 0.25, 1.0).to(state.scale.dtype)
        g, hg = Broyden._scaled(state.g, shrink), Broyden._scaled(state.hg, shrink)
        next_x = torch.where(blown[:, None], state.x - hg, state.next_x)  # the others as the kernel rounded it
        return evolve(state, scale=state.scale * shrink, g=g, gnorm=state.gnorm * shrink, hg=hg, next_x=next_x)

    @staticmethod
    def _scaled(g: Tensor, scale: Tensor) -> Tensor:
        """scale (B,) times g (B, D), in fp32/fp64, stored in g's dtype."""
        return (g.to(scale.dtype) * scale[:, None]).to(g.dtype)

    @staticmethod
    def _apply(state: BroydenState, y: Tensor, transpose: bool = False) -> Tensor:
        """H y (or H^T y) for H = -I + sum_i alive_i u_i v_i^T: (B, D) -> (B, D), over used slots only."""
        n = state.count
        first, second = (state.U, state.V) if transpose else (state.V, state.U)
        first, second = first[:, :n].to(y.dtype), second[:, :n].to(y.dtype)  # a narrower history: in y's dtype
        coeff = torch.bmm(first, y.unsqueeze(2)).squeeze(2) * state.alive[:, :n]  # (B, n)
        return torch.baddbmm(-y.unsqueeze(1), coeff.unsqueeze(1), second).squeeze(1)

    def step(self, fn, state, active, frozen):
        return state.next_x, state  # written by the update's last pass

    def update(self, state, x, fx, g, gnorm):
        if state.scale is not None:
            g, gnorm = self._scaled(g, state.scale), gnorm * state.scale
        new = BroydenStep(x, g, gnorm, dx=x - state.x)
        # H g_new and H^T dx, and the dot products below, in two passes over U and V
        coeff = self.kernels.broyden_dots(state, new)  # (B, 2, count), of every term
        applies = self.kernels.broyden_combine(state, new, coeff)
        # u, v into the next slot; H' g_new = H g_new + u (v . g_new) without another pass over U, V;
        # a step that blew the residual up forgets the Jacobian and stays at the old iterate
        # a step from H = -scale I (no terms alive) that blew up would be taken again: as broyden_finish decides
        blown = None if state.scale is None else ~(new.gnorm <= self.growth * state.gnorm) & ~state.alive.any(1)
        state = self.kernels.broyden_finish(state, new, applies, growth=self.growth)
        if blown is not None:
            state = self._shrink(state, blown)
        if state.count == self.m:  # memory full: keep the dominant half of H + I
            _reduce_rank(state.U, state.V, state.alive, self.m // 2)
            state = evolve(state, count=self.m // 2)
            hg = self._apply(state, state.g)
            state = evolve(state, hg=hg, next_x=state.x - hg)
        return state


@_common_doc
def broyden(
    f: Map,
    x0: Tensor,
    *,
    args: tuple | None = None,
    tol: float = 1e-4,
    max_iter: int = 50,
    stop: str = "rel",
    divergence: float | None = 1e6,
    check_every: int = 1,
    m: int = 20,
    growth: float = 1e2,
    beta: float | str = 1.0,
    history_dtype: torch.dtype | None = None,
    impl: str = "auto",
) -> Solution:
    """Limited-memory "good" Broyden on g(x) = f(x) - x, per sample.

    The inverse Jacobian of g starts at -beta I (the first step is a damped
    Picard step x + beta g) and receives one rank-one update per iteration. When ``m`` updates are
    stored, they are replaced by their best rank-m/2 part (Broyden rank
    reduction, one small SVD: a host sync every m/2 iterations on GPUs), so
    memory is 2 m B D, whatever max_iter.

    Args:
        {common}
        m: rank-one updates kept, at least 2 (the rank reduction keeps m // 2).
        growth: forget a sample's Jacobian (back to -beta I, and stay at its
            last iterate) when a step multiplies ||f(x) - x|| by more than this.
        beta: the initial inverse Jacobian's scale, a positive number, or "auto":
            per sample, scipy's 0.5 max(||x0||, 1) / ||f(x0) - x0|| (scipy's
            broyden1 default; for badly scaled maps x + F(x)).
        history_dtype: None (the iterate's dtype), or a narrower one (torch.bfloat16,
            torch.float16; fp32 under fp64) to store the rank-one factors U, V in;
            each term is stored balanced, (s u, v / s), and every product
            accumulates in fp32 (docs/solvers.md, "Low-precision history").
        {impl}
    """
    m = check_int("m", m, 2)
    growth = check_positive("growth", growth)
    beta = _check_beta("beta", beta, None)
    history_dtype = check_history_dtype(history_dtype, _flat_dtype(x0))
    kern = _kernels(impl, x0)
    solver = Broyden(m=m, growth=growth, beta=beta, kernels=kern, history_dtype=history_dtype)
    return solve(solver, f, x0, args=args, tol=tol, max_iter=max_iter, stop=stop, divergence=divergence,
                 check_every=check_every)  # fmt: skip

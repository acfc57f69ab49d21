"""Newton-Krylov on g(z) = f(z) - z: batched restarted GMRES, autograd JVPs, per-sample step control."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import check_int, check_interval, check_memory, row_norms, stat_dtype
from ._solve import Solution, Solver, solve
from ._solvers import Map, _common_doc
from .kernels.groups import evolve

__all__ = ["newton", "gmres"]


def gmres(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    rtol: Tensor,
    restart: int,
    max_restarts: int,
    active: Tensor | None = None,
) -> Tensor:
    """Solve A x = b per sample with restarted GMRES, x0 = 0.

    matvec: (B, D) -> (B, D), the batched operator A.
    b: (B, D) right-hand sides (fp32/fp64). rtol: (B,) per-sample relative tolerances.
    Stops when every ``active`` sample has ||b - A x|| <= rtol ||b||, or the budget
    of (max_restarts + 1) * restart products is spent.
    """
    batch, dim = b.shape
    active = torch.ones(batch, dtype=torch.bool, device=b.device) if active is None else active
    tiny = torch.finfo(b.dtype).tiny
    bnorm = row_norms(b, b.dtype)  # (B,)
    x = torch.zeros_like(b)
    r = b
    for cycle in range(max_restarts + 1):
        if cycle:
            r = b - matvec(x)
        beta = row_norms(r, b.dtype)  # (B,)
        basis = b.new_zeros(batch, restart + 1, dim)  # (B, k+1, D) Arnoldi vectors
        hess = b.new_zeros(batch, restart + 1, restart)  # (B, k+1, k) Hessenberg matrix
        basis[:, 0] = r / beta.clamp_min(tiny)[:, None]
        e1 = b.new_zeros(batch, restart + 1)
        e1[:, 0] = beta
        for j in range(restart):
            w = matvec(basis[:, j])
            for _ in range(2):  # classical Gram-Schmidt, twice (CGS2): orthogonal to rounding
                h = torch.bmm(basis[:, : j + 1], w.unsqueeze(2)).squeeze(2)  # (B, j+1)
                w = w - torch.bmm(h.unsqueeze(1), basis[:, : j + 1]).squeeze(1)
                hess[:, : j + 1, j] += h
            hnorm = row_norms(w, b.dtype)
            hess[:, j + 1, j] = hnorm
            basis[:, j + 1] = w / hnorm.clamp_min(tiny)[:, None]
            y = _least_squares(hess[:, : j + 2, : j + 1], e1[:, : j + 2])  # (B, j+1)
            resid = row_norms(e1[:, : j + 2] - torch.bmm(hess[:, : j + 2, : j + 1], y.unsqueeze(2)).squeeze(2), b.dtype)
            done = ~active | ~(resid > rtol * bnorm)
            if bool(done.all()) or j == restart - 1:
                x = x + torch.bmm(y.unsqueeze(1), basis[:, : j + 1]).squeeze(1)
                break
        if bool(done.all()):
            break
    return x


def _least_squares(h: Tensor, rhs: Tensor) -> Tensor:
    """min_y ||rhs - h y|| for (B, k+1, k) h via QR in fp64; non-finite rows become 0."""
    q, r = torch.linalg.qr(h.double())
    qtb = torch.bmm(q.transpose(1, 2), rhs.double().unsqueeze(2))  # (B, k, 1)
    diag = torch.diagonal(r, dim1=1, dim2=2)
    r = r + torch.diag_embed(torch.where(diag == 0, 1.0, 0.0))  # lucky breakdown / zero rhs
    y = torch.linalg.solve_triangular(r, qtb, upper=True).squeeze(2)
    return torch.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0).to(h.dtype)


# what torch says when f has no forward-mode derivative: an autograd.Function without a jvp staticmethod
# (or without setup_context, which torch.func needs), or an op without a forward-mode formula
_NO_FORWARD_AD = ("jvp function", "setup_context", "forward AD", "forward mode AD", "forward-mode AD")


def _jvp_forward(fn: Map, x: Tensor, caller: str = "newton") -> Callable[[Tensor], Tensor]:
    """v -> J_f(x) v by forward-mode autograd (one call of f per product); ``caller`` names the function whose
    ``jvp='forward'`` an error message blames."""

    def product(v: Tensor) -> Tensor:
        try:
            with torch.enable_grad():
                return torch.func.jvp(fn, (x,), (v.to(x.dtype),))[1]
        except (RuntimeError, NotImplementedError) as err:
            if not any(marker in str(err) for marker in _NO_FORWARD_AD):
                raise
            raise ValueError(
                f"{caller}(jvp='forward') takes Jacobian-vector products of f by forward-mode autograd "
                "(torch.func.jvp), which f does not support (e.g. a torch.autograd.Function without a jvp "
                "staticmethod): use jvp='reverse', which needs only f's backward; torch said: "
                f"{type(err).__name__}: {err}"
            ) from err

    return product


def _jvp_reverse(fn: Map, x: Tensor) -> Callable[[Tensor], Tensor]:
    """v -> J_f(x) v by differentiating a vector-Jacobian product (one call of f per Newton step)."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        fx = fn(xg)
        u = torch.zeros_like(fx, requires_grad=True)
        (vjp,) = torch.autograd.grad(fx, xg, u, create_graph=True)

    def product(v: Tensor) -> Tensor:
        with torch.enable_grad():
            return torch.autograd.grad(vjp, u, v.to(x.dtype), retain_graph=True)[0]

    return product


@dataclass(frozen=True)
class _NewtonState:
    x: Tensor  # (B, D) accepted iterate
    g: Tensor  # (B, D) f(x) - x there
    gnorm: Tensor  # (B,)
    direction: Tensor  # (B, D) Newton direction from x
    lam: Tensor  # (B,) step length being tried
    eta: Tensor  # (B,) forcing term: GMRES relative tolerance
    fresh: Tensor  # (B,) bool: needs a new direction (last step accepted)


@dataclass(frozen=True)
class Newton(Solver):
    """Inexact Newton-Krylov on g(x) = f(x) - x: batched GMRES directions (its step calls f for JVPs)."""

    krylov_dim: int = 20
    max_restarts: int = 1
    eta_max: float = 0.9
    min_step: float = 1 / 64
    jvp: str = "forward"

    def init(self, x, fx, g, gnorm):
        batch, dim = x.shape
        sdt = stat_dtype(x.dtype)
        nbytes = batch * (self.krylov_dim + 1) * (dim + self.krylov_dim) * sdt.itemsize  # GMRES's basis, Hessenberg
        check_memory("krylov_dim", self.krylov_dim, nbytes, f"GMRES's ({batch}, krylov_dim + 1, {dim}) basis", x.device)
        ones = torch.ones(batch, dtype=sdt, device=x.device)
        fresh = torch.ones(batch, dtype=torch.bool, device=x.device)
        return _NewtonState(x, g, gnorm, torch.zeros_like(x), ones, ones * 0.5, fresh)

    def step(self, fn, state, active, frozen):
        need = active & state.fresh
        if bool(need.any()):
            jv = (_jvp_forward if self.jvp == "forward" else _jvp_reverse)(fn, state.x)
            sdt = state.gnorm.dtype
            # J_g d = -g with J_g = J_f - I
            d = gmres(
                lambda v: jv(v).to(sdt) - v,
                -state.g.to(sdt),
                rtol=state.eta,
                restart=self.krylov_dim,
                max_restarts=self.max_restarts,
                active=need,
            )
            state = evolve(state, direction=torch.where(need[:, None], d.to(state.x.dtype), state.direction))
        x_next = state.x + state.lam.to(state.x.dtype)[:, None] * state.direction
        return x_next, state

    def update(self, state, x, fx, g, gnorm):
        # Armijo test on ||g||; a rejected step halves lambda and reuses the direction.
        accept = gnorm <= (1 - 1e-4 * state.lam) * state.gnorm
        accept |= torch.isfinite(gnorm) & (state.lam * 0.5 < self.min_step)  # give up shrinking
        # Eisenstat-Walker choice 2 forcing term, safeguarded
        ratio = (gnorm / state.gnorm.clamp_min(torch.finfo(gnorm.dtype).tiny)) ** 2
        eta = torch.minimum(0.9 * ratio, torch.full_like(ratio, self.eta_max))
        eta = torch.maximum(eta, torch.where(0.9 * state.eta**2 > 0.1, 0.9 * state.eta**2, 0.0)).clamp(
            1e-6, self.eta_max
        )
        keep = ~accept
        return _NewtonState(
            x=torch.where(keep[:, None], state.x, x),
            g=torch.where(keep[:, None], state.g, g),
            gnorm=torch.where(keep, state.gnorm, gnorm),
            direction=state.direction,
            lam=torch.where(keep, state.lam * 0.5, 1.0),
            eta=torch.where(keep, state.eta, eta),
            fresh=accept,
        )


@_common_doc
def newton(
    f: Map,
    x0: Tensor,
    *,
    args: tuple | None = None,
    tol: float = 1e-4,
    max_iter: int = 50,
    stop: str = "rel",
    divergence: float | None = 1e6,
    check_every: int = 1,
    krylov_dim: int = 20,
    max_restarts: int = 1,
    eta_max: float = 0.9,
    min_step: float = 1 / 64,
    jvp: str = "forward",
) -> Solution:
    """Newton-Krylov on g(z) = f(z) - z.

    Each iteration solves J_g d = -g inexactly with restarted GMRES (relative
    tolerance given by the Eisenstat-Walker forcing term), using autograd
    Jacobian-vector products of f: no finite differences, no dense Jacobian.
    Step control is per sample: a step that does not decrease ||g|| enough is
    halved along the same direction at the next iteration.

    Args:
        {common}
        krylov_dim: GMRES restart length (Krylov vectors kept).
        max_restarts: GMRES restarts after the first cycle.
        eta_max: largest forcing term (GMRES relative tolerance).
        min_step: the smallest step length tried before a step is taken anyway.
        jvp: "forward" (torch.func.jvp, one f call per product) or "reverse"
            (double backward through one recorded call of f; for f without
            forward-mode support).
    """
    krylov_dim = check_int("krylov_dim", krylov_dim, 1)
    max_restarts = check_int("max_restarts", max_restarts, 0)
    eta_max = check_interval("eta_max", eta_max, 0.0, 1.0)
    min_step = check_interval("min_step", min_step, 0.0, 1.0)
    if jvp not in ("forward", "reverse"):
        raise ValueError(f"jvp must be 'forward' or 'reverse', got {jvp!r}")
    if jvp == "reverse" and torch.is_inference_mode_enabled():
        raise ValueError(
            "newton(jvp='reverse') differentiates f with autograd, which torch.inference_mode() turns off: "
            "use jvp='forward' (the default) or torch.no_grad()"
        )
    solver = Newton(krylov_dim=krylov_dim, max_restarts=max_restarts, eta_max=eta_max, min_step=min_step, jvp=jvp)
    return solve(solver, f, x0, args=args, tol=tol, max_iter=max_iter, stop=stop, divergence=divergence,
                 check_every=check_every)  # fmt: skip

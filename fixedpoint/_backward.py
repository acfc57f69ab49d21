"""Gradients through fixed points: implicit, jfb, phantom, unrolled, stochastic_jfb; jacobian_penalty.

Solvers return a fixed point without a graph. Each function here takes f and a
point and returns a tensor equal to (an application of f at) the fixed point
that carries a graph to everything f depends on: its parameters and the
tensors it closes over (an injection, say). Shapes: z is (B, ...), like x0, or a tuple / list / dict
(nested) of such tensors sharing the batch: f gets and returns that structure, the mode runs on the
leaves' concatenation (B, D) and returns its result in the structure (views of one tensor).
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._common import (
    Status,
    as_integer,
    autocast_dtype,
    check_int,
    check_interval,
    check_positive,
    row_norms,
    stat_dtype,
)
from ._newton import gmres, newton
from ._solve import Solution, check_map_output
from ._solvers import anderson
from ._tree import flat_problem, is_structure

__all__ = [
    "ConvergenceWarning",
    "GradInfo",
    "implicit",
    "jfb",
    "phantom",
    "unrolled",
    "stochastic_jfb",
    "jacobian_penalty",
]

Map = Callable[[Tensor], Tensor]


DEFAULT_ADJOINT_TOL = {torch.float64: 1e-8, torch.float32: 1e-6}  # half precision: 1e-2
UNCONVERGED = ("jfb", "phantom", "exact")  # implicit's policies for samples without a converged solve
PHANTOM_FALLBACK = {"k": 5, "damping": 0.5}  # unconverged="phantom": phantom's own defaults


class ConvergenceWarning(RuntimeWarning):
    """An adjoint (backward) solve stopped without reaching its tolerance."""


@dataclass
class GradInfo:
    """Statistics a backward mode leaves for the caller (pass one in as ``info=``).

    implicit, filled during backward:
        backward: the adjoint Solution of the samples whose adjoint was solved (None when none was; its x
            flat, (B, D), for a structured state).
        adjoint_samples: their indices in the batch (B,) when not every sample's adjoint was solved
            (samples whose forward did not converge are not solved under a fallback policy); None: all.
        fallback_forward: samples given the fallback gradient because their forward solve had not converged.
        fallback_adjoint: samples given it because their adjoint solve missed ``slack`` x its tolerance.
    stochastic_jfb: no_grad_steps, grad_steps, the iterations it drew and ran.
    """

    backward: Solution | None = None
    no_grad_steps: int | None = None
    grad_steps: int | None = None
    adjoint_samples: Tensor | None = None
    fallback_forward: int | None = None
    fallback_adjoint: int | None = None

    @property
    def fallbacks(self) -> int | None:
        """Samples that took implicit's fallback gradient, for either reason (None before a backward)."""
        if self.fallback_forward is None or self.fallback_adjoint is None:
            return None
        return self.fallback_forward + self.fallback_adjoint


def _check_map(f) -> None:
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")


def _check_tensor(name: str, z) -> None:
    if not isinstance(z, Tensor):
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got dtype {z.dtype}")


def _on_flat(mode: Callable[..., Tensor], f: Map, z: Any, name: str, **options) -> Any:
    """``mode`` on a structured state ``z``: run on the flat (B, D) problem, its result in z's structure."""
    flat_f, flat_z, layout = flat_problem(f, z, name)
    return layout.unflatten(mode(flat_f, flat_z, **options))


def _apply(f: Map, z: Tensor) -> Tensor:
    """f(z), checked: a floating-point tensor of z's shape, on z's device."""
    return check_map_output(f(z), z.shape, z.device)


def jfb(f: Map, z: Tensor) -> Tensor:
    """Jacobian-free backprop: one differentiable application f(z*) at the detached fixed point.

    The gradient is that of one layer: it ignores the (I - J)^-1 factor, which
    is cheap and often good enough for training (Fung et al., 2022).
    """
    _check_map(f)
    if is_structure(z):
        return _on_flat(jfb, f, z, "z")
    _check_tensor("z", z)
    return _apply(f, z.detach())


def phantom(f: Map, z: Tensor, *, k: int = 5, damping: float = 0.5) -> Tensor:
    """Phantom gradient: k damped differentiable steps z <- (1 - damping) z + damping f(z) from z*.

    (Geng et al., 2021.) k = 1, damping = 1 is :func:`jfb`.
    """
    _check_map(f)
    if is_structure(z):
        return _on_flat(phantom, f, z, "z", k=k, damping=damping)
    _check_tensor("z", z)
    k = check_int("k", k, 1)
    damping = check_interval("damping", damping, 0.0, 1.0)
    z = z.detach()
    for _ in range(k):
        z = (1 - damping) * z + damping * _apply(f, z) if damping != 1.0 else _apply(f, z)
    return z


def unrolled(f: Map, z0: Tensor, *, steps: int, damping: float = 1.0) -> Tensor:
    """Backprop through every iteration: ``steps`` differentiable damped Picard steps from z0.

    Memory grows with ``steps`` (one graph of f per step); a reference for the
    other modes and for short solves. z0 keeps its graph, if it has one.
    """
    _check_map(f)
    if is_structure(z0):
        return _on_flat(unrolled, f, z0, "z0", steps=steps, damping=damping)
    _check_tensor("z0", z0)
    steps = check_int("steps", steps, 1)
    damping = check_interval("damping", damping, 0.0, 1.0)
    z = z0
    for _ in range(steps):
        z = (1 - damping) * z + damping * _apply(f, z) if damping != 1.0 else _apply(f, z)
    return z


def _check_range(name: str, value, minimum: int) -> tuple[int, int]:
    pair = [as_integer(v) for v in value] if isinstance(value, (tuple, list)) else []
    if len(pair) != 2 or None in pair or pair[0] < minimum or pair[0] > pair[1]:
        raise ValueError(f"{name} must be a pair of integers (low, high) with {minimum} <= low <= high, got {value!r}")
    return pair[0], pair[1]


def stochastic_jfb(
    f: Map,
    x0: Tensor,
    *,
    no_grad: tuple[int, int] = (0, 10),
    with_grad: tuple[int, int] = (1, 12),
    generator: torch.Generator | None = None,
    info: GradInfo | None = None,
) -> Tensor:
    """Stochastic Jacobian-free backprop, the FPDM training scheme.

    Draws n_ng uniformly from ``no_grad`` and n_g from ``with_grad`` (both
    inclusive), runs n_ng iterations of f from x0 under no_grad, then n_g
    iterations with gradient. x0 is detached: gradient reaches f's parameters
    and the tensors f closes over (the injection), never x0. The counts drawn
    are left in ``info`` (a :class:`GradInfo`). Reproducible with ``generator``.
    """
    _check_map(f)
    if is_structure(x0):
        return _on_flat(stochastic_jfb, f, x0, "x0", no_grad=no_grad, with_grad=with_grad, generator=generator,
                        info=info)  # fmt: skip
    _check_tensor("x0", x0)
    lo_ng, hi_ng = _check_range("no_grad", no_grad, 0)
    lo_g, hi_g = _check_range("with_grad", with_grad, 1)
    n_ng = int(torch.randint(lo_ng, hi_ng + 1, (), generator=generator))
    n_g = int(torch.randint(lo_g, hi_g + 1, (), generator=generator))
    z = x0.detach()
    with torch.no_grad():
        for _ in range(n_ng):
            z = _apply(f, z)
    for _ in range(n_g):
        z = _apply(f, z)
    if info is not None:
        info.no_grad_steps, info.grad_steps = n_ng, n_g
    return z


class _Adjoint(torch.autograd.Function):
    """Identity on f(z*) whose backward solves u = J_f(z*)^T u + grad before passing u on.

    The graph of the one call fz = f(z) is used twice: by the adjoint solve
    (vector-Jacobian products with retain_graph) and then by autograd itself,
    which carries u on to f's parameters and closures. Memory: one graph of f.
    """

    @staticmethod
    def forward(ctx, fz: Tensor, z: Tensor, solve: Callable) -> Tensor:
        ctx.fz, ctx.z, ctx.solve = fz, z, solve  # fz keeps its graph: the adjoint needs it
        return fz.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        if torch.is_grad_enabled():  # create_graph=True: the graph would miss how u depends on the inputs
            raise RuntimeError(
                "implicit gives first-order gradients only: backward with create_graph=True (a gradient "
                "penalty, second derivatives) would silently drop the adjoint's own dependence on the "
                "inputs; differentiate through fixedpoint.unrolled or phantom steps instead"
            )
        fz, z = ctx.fz, ctx.z

        def vjp(u: Tensor) -> Tensor:  # u^T J_f(z*); 0 where f(z) does not depend on z
            if not fz.requires_grad:
                return torch.zeros_like(u)
            with torch.enable_grad():
                (product,) = torch.autograd.grad(fz, z, u, retain_graph=True, allow_unused=True)
            return torch.zeros_like(u) if product is None else product

        u = ctx.solve(vjp, grad)
        return u, None, None


def implicit(
    f: Map,
    z: Tensor,
    *,
    solver: Callable[..., Solution] = anderson,
    tol: float | None = None,
    max_iter: int = 200,
    stop: str = "rel",
    warn: bool | str = True,
    info: GradInfo | None = None,
    status: Solution | Tensor | None = None,
    unconverged: str = "jfb",
    slack: float = 10.0,
    **solver_options,
) -> Tensor:
    """Exact implicit-function-theorem gradient through the fixed point z* of f.

    Returns f(z*) (equal to z* at convergence). In the backward pass the
    adjoint equation u = J_f(z*)^T u + grad is solved with ``solver`` (any
    fixedpoint solver; Newton's linear system goes straight to GMRES) at
    ``tol`` / ``max_iter`` / ``stop``, with ``solver_options`` passed on (a
    misspelt one is a TypeError at the call). First-order only: a backward
    with ``create_graph=True`` is a RuntimeError, not a wrong second derivative. The defaults are
    tight on purpose (an inaccurate adjoint is the usual reason IFT gradients
    are wrong): ``tol=None`` means 1e-8 for fp64, 1e-6 for fp32 and 1e-2 for
    fp16/bf16 gradients or for f run under fp16/bf16 autocast, near what each
    precision can reach. Memory is one
    graph of f, whatever the forward iterations.

    Samples without a converged solve (the adjoint is per sample, as f is):

    - ``status``: the forward Solution (or its (B,) ``status``). A sample whose
      forward did not converge (MAX_ITER, DIVERGED, NONFINITE) sits where the
      IFT does not hold, often where J's spectral radius is near 1, and its
      adjoint can explode. Without ``status`` every sample counts as converged.
    - An adjoint that stops with residual <= ``slack`` x tol is used (its best
      iterate); one that misses by more (or is not finite) is not.
    - ``unconverged`` says what such a sample gets instead: ``"jfb"`` (default)
      the JFB gradient, u = grad (one application of f); ``"phantom"``
      Geng et al.'s phantom gradient linearised at z, k = 5 damped adjoint steps
      u <- 0.5 u + 0.5 (J^T u + grad) from 0; ``"exact"`` no fallback: every
      sample's adjoint is solved and used as it stands (the behaviour before
      fallbacks existed). Under a fallback, samples whose forward did not
      converge are left out of the adjoint solve. ``info`` counts them
      (``fallback_forward``, ``fallback_adjoint``).

    Warnings: an adjoint residual above ``slack`` x tol raises a
    :class:`ConvergenceWarning` naming it, at ``implicit``'s call site; a miss
    within ``slack`` x tol (what the precision allows, e.g. 1.25e-6 against
    1e-6) does not. ``warn=True`` rate-limits them per call site (FixedPoint
    layers share one): the 1st, 10th, 100th, ... miss there warns, with the
    count; ``warn="always"`` warns at every miss, ``warn=False`` never. The
    adjoint Solution is left in ``info.backward`` either way.
    """

    _check_map(f)
    layout = None
    if is_structure(z):  # inline, not by _on_flat: the warnings point at implicit's caller's frame
        f, z, layout = flat_problem(f, z, "z")
    _check_tensor("z", z)
    if not callable(solver):
        raise TypeError(f"solver must be a fixedpoint solver function, got {type(solver).__name__}")
    if tol is not None:
        tol = check_positive("tol", tol)
    max_iter = check_int("max_iter", max_iter, 1)
    if stop not in ("rel", "abs"):
        raise ValueError(f"stop must be 'rel' or 'abs', got {stop!r}")
    if not isinstance(unconverged, str) or unconverged not in UNCONVERGED:
        raise ValueError(f"unconverged must be one of {', '.join(map(repr, UNCONVERGED))}, got {unconverged!r}")
    slack = check_positive("slack", slack)
    if slack < 1:
        raise ValueError(f"slack must be >= 1 (a factor on tol), got {slack!r}")
    if not (isinstance(warn, bool) or (isinstance(warn, str) and warn == "always")):
        raise ValueError(f"warn must be True, False or 'always', got {warn!r}")
    forward_status = _check_status(status, z)
    _check_adjoint_options(solver, newton, solver_options)

    computed_in = autocast_dtype(z.device.type)  # f's precision under autocast: its graph's, so the adjoint's
    site = _call_site() if warn else None

    def run_solver(vjp: Callable[[Tensor], Tensor], grad: Tensor, tol_: float) -> Solution:
        if solver is newton:
            return _gmres_adjoint(vjp, grad, tol=tol_, max_iter=max_iter, stop=stop, **solver_options)
        return solver(lambda u: vjp(u) + grad, grad, tol=tol_, max_iter=max_iter, stop=stop, **solver_options)

    def solve_adjoint(vjp: Callable[[Tensor], Tensor], grad: Tensor) -> Tensor:
        tol_ = tol if tol is not None else default_adjoint_tol(grad.dtype, computed_in)
        u, sol, missed, counts = _adjoint_with_fallback(run_solver, vjp, grad, tol_, slack, forward_status, unconverged)
        if info is not None:
            info.backward, info.adjoint_samples = sol, counts["rows"]
            info.fallback_forward, info.fallback_adjoint = counts["forward"], counts["adjoint"]
        if missed and site is not None:
            _warn_adjoint_miss(sol, missed, tol_, slack, unconverged, site, always=warn == "always")
        return u

    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        fz = _apply(f, z)
        out = _Adjoint.apply(fz, z, solve_adjoint)  # (B, ...), or (B, D) for a structured state
    return out if layout is None else layout.unflatten(out)


def _check_status(status, z: Tensor) -> Tensor | None:
    """implicit's ``status``: a Solution or its (B,) integer status codes, for z's batch; None: not given."""
    if status is None:
        return None
    if isinstance(status, Solution):
        status = status.status
    if not isinstance(status, Tensor) or status.dtype.is_floating_point or status.dtype == torch.bool:
        what = type(status).__name__ if not isinstance(status, Tensor) else f"a {status.dtype} tensor"
        raise TypeError(f"status must be the forward Solution or its (B,) integer status codes, got {what}")
    if status.shape != z.shape[:1]:
        raise ValueError(f"status must have shape ({z.shape[0]},), one code per sample of z, got {tuple(status.shape)}")
    return status


def _rows_map(vjp: Callable[[Tensor], Tensor], like: Tensor, rows: Tensor | None) -> Callable[[Tensor], Tensor]:
    """The vector-Jacobian product on the samples ``rows`` of the batch only (b, ...) -> (b, ...): the others'
    rows are zero, and f acts on each sample on its own, so the kept rows are those of the whole batch's."""
    if rows is None:
        return vjp

    def product(u: Tensor) -> Tensor:
        full = like.new_zeros(like.shape).index_copy_(0, rows, u)
        return vjp(full).index_select(0, rows)

    return product


def _adjoint_with_fallback(
    run_solver: Callable, vjp: Callable, grad: Tensor, tol: float, slack: float, status: Tensor | None, policy: str
) -> tuple[Tensor, Solution | None, int, dict]:
    """implicit's backward: the adjoint u (B, ...), its Solution, the count of samples whose adjoint missed
    ``slack`` x tol (a warning's), and the counts for GradInfo. See implicit's docstring for the policy."""

    batch = grad.shape[0]
    fallback = policy != "exact"
    forward_bad = None
    if fallback and status is not None:
        forward_bad = status.to(grad.device) != Status.CONVERGED
        if not bool(forward_bad.any()):  # the usual case: one sync, and the whole batch is solved as it is
            forward_bad = None
    rows = None if forward_bad is None else (~forward_bad).nonzero().squeeze(1)
    n_forward = 0 if forward_bad is None else batch - rows.numel()
    sol, missed, accepted = None, 0, None
    if rows is None or rows.numel():
        sol = run_solver(_rows_map(vjp, grad, rows), grad if rows is None else grad.index_select(0, rows), tol)
        accepted = sol.converged | (sol.residual <= slack * tol)  # NaN residuals are not accepted
        missed = int((~accepted).sum())
    counts = {"rows": rows, "forward": n_forward, "adjoint": missed if fallback else 0}
    if not fallback:
        return sol.x, sol, missed, counts
    u = grad.clone()  # samples without a usable adjoint: JFB's u = grad (phantom's below)
    bad = torch.ones(batch, dtype=torch.bool, device=grad.device)
    if sol is not None:
        solved = sol.x
        if missed:
            keep = accepted.view(-1, *[1] * (grad.ndim - 1))
            solved = torch.where(keep, sol.x, grad if rows is None else grad.index_select(0, rows))
        if rows is None:
            u, bad = solved, ~accepted
        else:
            u.index_copy_(0, rows, solved)
            bad.index_copy_(0, rows, ~accepted)
    if policy == "phantom" and (n_forward or missed):
        fallen = bad.nonzero().squeeze(1)
        u.index_copy_(0, fallen, _phantom_adjoint(_rows_map(vjp, grad, fallen), grad.index_select(0, fallen)))
    return u, sol, missed, counts


def _phantom_adjoint(vjp: Callable[[Tensor], Tensor], grad: Tensor) -> Tensor:
    """k damped adjoint steps u <- (1 - d) u + d (J^T u + grad) from 0: the backward of phantom's k damped
    forward steps with J held at z (its exact gradient for a linear f). k = 1, d = 1 is JFB's u = grad."""
    k, damping = PHANTOM_FALLBACK["k"], PHANTOM_FALLBACK["damping"]
    u = torch.zeros_like(grad)
    for _ in range(k):
        u = (1 - damping) * u + damping * (vjp(u) + grad)
    return u


_MISSES: dict[tuple[str, int], int] = {}  # adjoint misses counted per implicit call site (warn=True)


def _call_site() -> tuple[str, int]:
    """The file and line that called implicit (its caller's frame): where its warnings point."""
    frame = sys._getframe(2)
    return frame.f_code.co_filename, frame.f_lineno


def _warn_adjoint_miss(
    sol: Solution, missed: int, tol: float, slack: float, policy: str, site: tuple[str, int], *, always: bool
) -> None:
    """A ConvergenceWarning at implicit's call site: every miss when ``always``, else the 1st, 10th, 100th, ...
    miss at that site."""
    count = _MISSES[site] = _MISSES.get(site, 0) + 1
    if not always and str(count).rstrip("0") != "1":  # 1, 10, 100, ...
        return
    consequence = {
        "jfb": "they took the JFB gradient (unconverged='jfb')",
        "phantom": "they took the phantom gradient (unconverged='phantom')",
        "exact": "their gradients are approximate (unconverged='exact')",
    }[policy]
    repeat = "" if always else f"; miss {count} at this call site (reported at the 1st, 10th, 100th, ...)"
    message = (
        f"implicit: the adjoint solve of {missed} of {sol.x.shape[0]} samples stopped at residual "
        f"{float(sol.residual.max()):.3g} (tol {tol:g}, accepted up to {slack:g}x) after {int(sol.nsteps.max())} "
        f"iterations; {consequence}{repeat}"
    )
    warnings.warn_explicit(message, ConvergenceWarning, site[0], site[1])


def default_adjoint_tol(grad_dtype: torch.dtype, autocast: torch.dtype | None = None) -> float:
    """implicit's tolerance where none is given: near what the gradient's precision, or the lower precision
    autocast ran f in, can reach (1e-8 fp64, 1e-6 fp32, 1e-2 fp16/bf16)."""
    dtypes = [grad_dtype] if autocast is None else [grad_dtype, autocast]
    return max(DEFAULT_ADJOINT_TOL.get(dtype, 1e-2) for dtype in dtypes)


def _check_adjoint_options(solver: Callable, newton: Callable, options: dict) -> None:
    """The adjoint solver's options by name, before any backward runs (their values are checked there)."""
    if solver is newton:
        unknown = sorted(set(options) - {"krylov_dim"})
        if unknown:
            raise TypeError(
                f"implicit with solver=newton solves the adjoint's linear system by GMRES, which takes only "
                f"krylov_dim (besides tol, max_iter, stop); got {', '.join(unknown)}"
            )
        if "krylov_dim" in options:
            check_int("krylov_dim", options["krylov_dim"], 1)
        return
    try:
        params = inspect.signature(solver).parameters
    except (TypeError, ValueError):  # not introspectable: checked when the backward runs
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(options) - set(params))
    if unknown:
        name = getattr(solver, "__name__", type(solver).__name__)
        raise TypeError(f"implicit: {name} has no option {', '.join(unknown)}")


def _gmres_adjoint(
    vjp, grad: Tensor, *, tol: float, max_iter: int, stop: str = "rel", krylov_dim: int = 20
) -> Solution:
    """(I - J^T) u = grad by GMRES(krylov_dim) within max_iter products (at least 2: one Krylov step and the
    residual's check); a Solution for the caller.

    ``stop`` measures the residual ||grad - (I - J^T) u|| relative to ||grad|| or absolutely.
    ``nsteps`` and ``nfev`` count the vector-Jacobian products used.
    """

    batch, shape = grad.shape[0], grad.shape
    sdt = stat_dtype(grad.dtype)
    products = [0]

    def matvec(v: Tensor) -> Tensor:
        products[0] += 1
        v = v.to(grad.dtype)
        return (v - vjp(v.view(shape)).reshape(batch, -1)).to(sdt)

    rhs = grad.reshape(batch, -1).to(sdt)
    scale = row_norms(rhs, sdt).clamp_min(torch.finfo(sdt).tiny)  # (B,) ||grad||
    rtol = torch.full((batch,), tol, dtype=sdt, device=grad.device) if stop == "rel" else tol / scale
    # products: restart in the first cycle, one more (its residual) in each later one, one for the check
    restart = min(krylov_dim, max(max_iter - 1, 1))
    cycles = max(max_iter // (restart + 1), 1)
    u = gmres(matvec, rhs, rtol=rtol, restart=restart, max_restarts=cycles - 1)
    resid = row_norms(rhs - matvec(u), sdt) / (scale if stop == "rel" else 1.0)
    status = torch.where(resid <= tol, Status.CONVERGED, Status.MAX_ITER)
    nsteps = torch.full((batch,), products[0], dtype=torch.long, device=grad.device)
    u = u.to(grad.dtype).view(shape)
    return Solution(u, grad + vjp(u), resid, nsteps, status, resid[None], nfev=products[0])


def jacobian_penalty(f: Map, z: Tensor, *, samples: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """Hutchinson estimate of ||J_f(z)||_F^2 / D per sample, differentiable (a DEQ regulariser).

    Uses ``samples`` Gaussian probes v: E ||v^T J||^2 = ||J||_F^2. Divided by
    the feature size D, as TorchDEQ's ``jac_reg`` is; ``.mean()`` gives its scalar.
    Returns (B,).
    """
    _check_map(f)
    if is_structure(z):  # ||J||_F^2 / D of the whole state, D its features over all leaves
        f, z, _ = flat_problem(f, z, "z")
    _check_tensor("z", z)
    samples = check_int("samples", samples, 1)
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        fz = _apply(f, z)
        total = z.new_zeros(z.shape[0])
        for _ in range(samples):
            v = torch.randn(z.shape, generator=generator, dtype=z.dtype).to(z.device)
            (vj,) = torch.autograd.grad(fz, z, v, create_graph=True)
            total = total + vj.reshape(z.shape[0], -1).pow(2).sum(dim=1)
    return total / (samples * z[0].numel())

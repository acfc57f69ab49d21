"""FixedPoint: an nn.Module that solves z = f(z, *inputs) and attaches a gradient."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from ._backward import GradInfo, implicit, jfb, phantom
from ._solve import Solution
from ._solvers import anderson

SolverFn = Callable[..., Solution]  # solver(f, x0, args=...) -> Solution, e.g. functools.partial(anderson, m=5)
BackwardFn = Callable[..., Tensor]  # backward(f, z, ...) -> Tensor, e.g. jfb or partial(implicit, tol=1e-6)


def _needs_grad(g: Callable[[Tensor], Tensor], x: Tensor, inputs: tuple, module: nn.Module) -> bool:
    """Whether f at x depends on anything that requires grad: an input, a parameter of the module (f's, when f
    is one), or else whatever f closes over (one probing call)."""
    if any(isinstance(t, Tensor) and t.requires_grad for t in inputs):
        return True
    if any(p.requires_grad for p in module.parameters()):
        return True
    with torch.enable_grad():
        return g(x.detach()).requires_grad


def _takes_keyword(fn: Callable, name: str, *, unknown: bool) -> bool:
    """Whether ``fn`` takes the keyword ``name`` (by that name, or as any keyword); ``unknown`` where its
    signature cannot be read."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return unknown
    return any(
        (p.name == name and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)) or p.kind == p.VAR_KEYWORD
        for p in parameters
    )


class FixedPoint(nn.Module):
    """A fixed-point layer: z* = f(z*, *inputs), differentiable by a chosen backward mode.

    Args:
        f: the map, called as ``f(z, *inputs)``; an nn.Module is registered as a submodule.
        solver: forward solver in training, ``solver(f, z0, args=inputs) ->
            Solution``: any fixedpoint solver (functools.partial for options).
            A solver without an ``args`` keyword gets ``solver(g, z0)``, g
            closing over the inputs.
            With ``graph=True`` its graph is kept across forwards: the inputs
            must then be all that f reads and that changes between forwards
            (besides parameters changed in place). None: no forward solve in training;
            the backward mode starts from z0 itself (``stochastic_jfb``, ``unrolled``).
        eval_solver: solver in eval mode or without grad (default: ``solver``,
            or ``anderson`` if that is None). In eval mode with grad enabled,
            when something f depends on requires grad, the output carries a
            gradient: ``backward`` at the eval solution (``implicit`` if
            there is no training solver, as for ``stochastic_jfb``).
        backward: ``backward(g, z) -> Tensor`` in training: ``implicit``
            (default), ``jfb``, ``phantom``, ``unrolled``, ``stochastic_jfb`` or
            a partial of one of them with its options.

    Every path returns f applied at (an approximation of) the fixed point: in
    eval, ``Solution.fx`` of the best iterate, which the solver computed anyway.
    After each call, ``last_solution`` holds the forward Solution (None when no
    solver ran) and ``last_info`` the :class:`GradInfo` of the backward mode.
    """

    def __init__(
        self,
        f: Callable[..., Tensor],
        *,
        solver: SolverFn | None = anderson,
        eval_solver: SolverFn | None = None,
        backward: BackwardFn = implicit,
    ) -> None:
        super().__init__()
        for name, fn in (("f", f), ("solver", solver), ("eval_solver", eval_solver), ("backward", backward)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        if f is None:
            raise TypeError("f must be callable, got NoneType")
        mode = backward.func if isinstance(backward, partial) else backward
        if solver is None and mode in (implicit, jfb, phantom):
            raise ValueError(
                f"solver=None runs no forward solve, so backward must iterate from z0 itself (stochastic_jfb, "
                f"unrolled); {mode.__name__} would start at z0 as if it were the fixed point"
            )
        self.f = f
        self.solver = solver
        self.eval_solver = eval_solver if eval_solver is not None else (solver or anderson)
        self.backward = backward
        self._backward_takes_info = _takes_keyword(backward, "info", unknown=False)
        self._takes_args: dict[int, tuple[SolverFn, bool]] = {}  # id -> (solver, takes args=): read once each
        self.last_solution: Solution | None = None
        self.last_info: GradInfo | None = None

    def forward(self, *inputs: Tensor, z0: Tensor | None = None) -> Tensor:
        """Solve from ``z0`` (default zeros shaped like ``inputs[0]``); returns z* (B, ...)."""
        if z0 is None:
            if not inputs:
                raise ValueError("FixedPoint needs z0 or at least one input to shape the zero start")
            z0 = torch.zeros_like(inputs[0])
        g = lambda z: self.f(z, *inputs)  # noqa: E731
        if not (self.training and torch.is_grad_enabled()):
            self.last_solution = self._solve(self.eval_solver, g, z0, inputs)
            self.last_info = None
            if not (torch.is_grad_enabled() and _needs_grad(g, self.last_solution.x, inputs, self)):
                return self.last_solution.fx  # f at the best iterate, as the training modes return
            # eval with autograd on (saliency maps, attacks): the backward mode at the eval solution; modes that
            # iterate from z0 themselves (no training solver) would not return it: implicit there
            return self._differentiate(self.backward if self.solver is not None else implicit, g, self.last_solution.x)
        start = z0
        self.last_solution = None
        if self.solver is not None:
            self.last_solution = self._solve(self.solver, g, z0, inputs)
            start = self.last_solution.x
        return self._differentiate(self.backward, g, start)

    def _solve(self, solver: SolverFn, g: Callable[[Tensor], Tensor], z0: Tensor, inputs: tuple) -> Solution:
        """``solver`` on z = f(z, *inputs): f and its inputs apart where it takes ``args`` (a graph=True
        solver then keeps its graph across forwards), else on g, which closes over them."""
        known = self._takes_args.get(id(solver))
        if known is None or known[0] is not solver:  # reading a signature costs ~80 us: once per solver
            known = self._takes_args[id(solver)] = (solver, _takes_keyword(solver, "args", unknown=True))
        return solver(self.f, z0, args=inputs) if known[1] else solver(g, z0)

    def _differentiate(self, backward: BackwardFn, g: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
        """``backward(g, z)``, recording its GradInfo in ``last_info`` where it takes one."""
        self.last_info = GradInfo()
        takes_info = self._backward_takes_info if backward is self.backward else backward is implicit
        return backward(g, z, info=self.last_info) if takes_info else backward(g, z)

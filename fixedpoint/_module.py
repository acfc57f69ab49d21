"""FixedPoint: an nn.Module that solves z = f(z, *inputs) and attaches a gradient."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor, nn

from . import _tree
from ._backward import GradInfo, implicit, jfb, phantom
from ._common import as_integer, autocast_dtype, check_int, check_positive
from ._diagnostics import spectral_radius as estimate_spectral_radius
from ._solve import ShapeChangeError, Solution
from ._solvers import anderson, picard
from ._tree import State

SolverFn = Callable[..., Solution]  # solver(f, x0, args=...) -> Solution, e.g. functools.partial(anderson, m=5)
BackwardFn = Callable[..., Tensor]  # backward(f, z, ...) -> Tensor, e.g. jfb or partial(implicit, tol=1e-6)

# FixedPoint's training defaults, chosen by measurement (benchmarks/deq_digits.py and deq_fashion.py with
# --candidates, 3 seeds each; docs/gradients.md): plain iteration to a relative 1e-3 within 40 iterations with
# the JFB gradient trained as well as the other candidates within the seeds' spread (digits tanh DEQ: 0.941 test
# accuracy; Anderson variants 0.926-0.937, phantom 0.945 in 8% more time, implicit 0.882-0.932; Fashion-MNIST
# conv DEQ: 0.826, all candidates 0.813-0.830) in the least time per epoch, on both tasks. The solver's own
# defaults (1e-4, 50 iterations) are for solving, not for training.
DEFAULT_SOLVER: SolverFn = partial(picard, tol=1e-3, max_iter=40)
DEFAULT_BACKWARD: BackwardFn = jfb

# The forward tolerance where the solver's own is out of reach: f in bf16/fp16 (autocast, or a half state).
# Measured (tanh DEQ, width 128, sklearn digits, Anderson's 50 iterations, ||W||_2 in 0.9..1.5): the best
# residual Anderson reaches is up to 1.6e-3 in bf16 and 1.7e-4 in fp16, and the solution's error against the
# fp32 fixed point is 3.5e-3..4e-3 (bf16) and 4e-4..6e-4 (fp16) whatever the tolerance. At tol 1e-4, 0-11%
# of bf16 samples converge (all the rest run to max_iter); at these tolerances 100% do in 7-17 iterations,
# with an error 1.1-1.4x (bf16) and 1.2-1.5x (fp16) the floor.
HALF_FORWARD_TOL = {torch.bfloat16: 3e-3, torch.float16: 5e-4}

SIGNATURES_KEPT = 16  # solvers whose signature a layer remembers (per-call solvers are new objects each call)


def _needs_grad(g: Callable[[Tensor], Tensor], x: Tensor, inputs: tuple, module: nn.Module) -> bool:
    """Whether f at x depends on anything that requires grad: an input, a parameter of the module (f's, when f
    is one), or else whatever f closes over (one probing call)."""
    if any(isinstance(t, Tensor) and t.requires_grad for t in inputs):
        return True
    if any(p.requires_grad for p in module.parameters()):
        return True
    with torch.enable_grad():
        out = g(_tree.detach(x))
    return any(t.requires_grad for t in _tree.leaves(out))


def _sets_keyword(fn: Callable, name: str) -> bool:
    """Whether ``fn`` is a functools.partial that sets the keyword ``name`` (nested partials are flattened)."""
    return isinstance(fn, partial) and name in fn.keywords


def _half_tol(dtypes: tuple, half_tol: float | None) -> float | None:
    """The forward tolerance for f computed in these dtypes (the state's, autocast's or None): the loosest
    half precision's (``half_tol`` if given, else HALF_FORWARD_TOL), or None where none is half."""
    tols = [HALF_FORWARD_TOL[d] if half_tol is None else half_tol for d in dtypes if d in HALF_FORWARD_TOL]
    return max(tols) if tols else None


def _default_tol(solver: SolverFn) -> float | None:
    """The tolerance ``solver`` runs at that is a default, not the user's choice: FixedPoint's default solver's,
    or the solver's own where it takes ``tol`` and no partial sets it; None otherwise (the user's is kept)."""
    if solver is DEFAULT_SOLVER:
        return DEFAULT_SOLVER.keywords["tol"]
    if _sets_keyword(solver, "tol") or not _takes_keyword(solver, "tol", unknown=False):
        return None
    try:
        default = inspect.signature(solver).parameters["tol"].default
    except (TypeError, ValueError, KeyError):
        return None
    return default if isinstance(default, float) else None


def _check_backward(solver: SolverFn | None, backward: BackwardFn) -> None:
    """A ValueError for a backward mode that starts at its z as if it were the fixed point, when no forward
    solver runs (``solver=None``)."""
    mode = backward.func if isinstance(backward, partial) else backward
    if solver is None and mode in (implicit, jfb, phantom):
        raise ValueError(
            f"solver=None runs no forward solve, so backward must iterate from z0 itself (stochastic_jfb, "
            f"unrolled); {mode.__name__} would start at z0 as if it were the fixed point"
        )


def _check_callable(name: str, fn: object) -> None:
    if fn is not None and not callable(fn):
        raise TypeError(f"{name} must be callable, got {type(fn).__name__}")


def _shape_hint(state: tuple[int, ...] | None) -> str:
    shape = "..." if state is None else repr(tuple(state))
    return f"give its shape, FixedPoint(f, state_shape={shape}), or a start function, z0=lambda *inputs: ..."


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
            Default ``partial(picard, tol=1e-3, max_iter=40)`` (``DEFAULT_SOLVER``:
            with the JFB gradient, what trained best per second on the DEQ
            benchmarks; ``anderson`` solves tighter).
            A solver without an ``args`` keyword gets ``solver(g, z0)``, g
            closing over the inputs. None: no forward solve in training;
            the backward mode starts from z0 itself (``stochastic_jfb``, ``unrolled``).
        eval_solver: solver in eval mode or without grad (default: ``solver``,
            or ``anderson`` if that is None). In eval mode with grad enabled,
            when something f depends on requires grad, the output carries a
            gradient: ``backward`` at the eval solution (``implicit`` if
            there is no training solver, as for ``stochastic_jfb``).
        backward: ``backward(g, z) -> Tensor`` in training: ``jfb``
            (default), ``implicit`` (the exact gradient; pair it with a tight
            forward solve), ``phantom``, ``unrolled``, ``stochastic_jfb`` or
            a partial of one of them with its options.

        z0: the start, ``z0(*inputs) -> Tensor`` (B, ...), when ``forward`` is
            given none; default: zeros shaped like ``inputs[0]``, or
            A start that is a tuple / list / dict of tensors (a multi-resolution
            DEQ's branches) makes the state that structure: f gets and returns
            it, and so does the layer (docs/deq.md, "Structured states").
        state_shape: the state's shape per sample, e.g. ``(128,)``: the start is
            zeros of shape (B, *state_shape), with the first input's device
            and dtype. Needed when the state is not shaped like the first input.
        half_tol: the least forward tolerance when f computes in half
            precision (under fp16/bf16 autocast, or a bf16/fp16 state) and the
            solver's tolerance is a default (the default solver's 1e-3, or a
            solver's own where ``functools.partial`` does not set it): None
            means 3e-3 for bf16, 5e-4 for fp16 (measured: what half precision
            reaches); a looser default stands. In fp32/fp64 the default stands.
            0: no floor, every default stands in half precision too.
        spectral_radius: power-iteration steps for an estimate of the spectral
            radius of f's Jacobian at each forward's solution (0, the default:
            none; each step is one more call of f, by forward-mode autograd):
            ``last_spectral_radius`` (B,) and ``convergence()["spectral_radius"]``
            (the largest). Below 1 plain iteration converges near the solution;
            a DEQ drifting towards 1 during training is becoming unstable.

    Every path returns f applied at (an approximation of) the fixed point: in
    eval, ``Solution.fx`` of the best iterate, which the solver computed anyway.
    After each call, ``last_solution`` holds the forward Solution (None when no
    solver ran) and ``last_info`` the :class:`GradInfo` of the backward mode;
    :meth:`convergence` sums them up as Python floats. A backward that takes
    ``status`` (``implicit``) gets the forward Solution, so that samples whose
    forward did not converge take its fallback gradient.
    """

    def __init__(
        self,
        f: Callable[..., Tensor],
        *,
        solver: SolverFn | None = DEFAULT_SOLVER,
        eval_solver: SolverFn | None = None,
        backward: BackwardFn = DEFAULT_BACKWARD,
        z0: Callable[..., Tensor] | None = None,
        state_shape: Sequence[int] | int | None = None,
        half_tol: float | None = None,
        spectral_radius: int = 0,
    ) -> None:
        super().__init__()
        for name, fn in (("f", f), ("solver", solver), ("eval_solver", eval_solver), ("backward", backward)):
            _check_callable(name, fn)
        if f is None:
            raise TypeError("f must be callable, got NoneType")
        if z0 is not None and not callable(z0):
            raise TypeError(
                f"z0 must be a function of the inputs, z0(*inputs) -> Tensor, got {type(z0).__name__}; "
                "a start tensor goes to forward: layer(x, z0=tensor)"
            )
        if z0 is not None and state_shape is not None:
            raise ValueError("give z0 or state_shape, not both: z0 makes the start, state_shape only shapes zeros")
        self.state_shape = None if state_shape is None else _check_shape(state_shape)
        self.z0 = z0
        self.half_tol = None if half_tol is None else 0.0 if half_tol == 0 else check_positive("half_tol", half_tol)
        _check_backward(solver, backward)
        self.f = f
        self.solver = solver
        self.eval_solver = eval_solver if eval_solver is not None else (solver or anderson)
        self.backward = backward
        self._backward_takes_info = _takes_keyword(backward, "info", unknown=False)
        self._backward_takes_status = _takes_keyword(backward, "status", unknown=False)
        # id -> (solver, takes args=, its default tol or None): read once per solver
        self._signatures: dict[int, tuple[SolverFn, bool, float | None]] = {}
        self._started = False  # a forward has run: f's failures are no longer blamed on the default start
        self.last_solution: Solution | None = None
        self.last_info: GradInfo | None = None
        self.spectral_radius_iters = 0 if spectral_radius == 0 else check_int("spectral_radius", spectral_radius, 2)
        self.last_spectral_radius: Tensor | None = None  # (B,) when spectral_radius > 0

    @torch.compiler.disable  # a compiled model runs the solve eagerly: one graph break, no recompiles
    def forward(
        self,
        *inputs: Tensor,
        z0: State | None = None,
        eval_solver: SolverFn | None = None,
        backward: BackwardFn | None = None,
    ) -> State:
        """Solve from ``z0`` (default: the layer's start, see ``z0``/``state_shape``, else zeros shaped like
        ``inputs[0]``); returns z* (B, ...), in z0's structure when that is a tuple / list / dict of tensors.

        ``eval_solver`` and ``backward`` are this call's, used where the layer's own would be (None: the
        layer's): a solver budget per call (a sampler's steps), or a backward mode with per-call options
        (``partial(layer.backward, generator=g)``). The layer's attributes are left as they are, so nothing
        of one call carries over to the next, even when it raises.

        Under ``torch.compile`` the layer is skipped (run eagerly; the solver's loop has per-sample stopping and
        host decisions a graph cannot hold): the model around it compiles, with a break here. Compile f itself
        (``FixedPoint(torch.compile(cell))``) to have its calls compiled too."""
        _check_callable("eval_solver", eval_solver)
        _check_callable("backward", backward)
        if backward is not None:
            _check_backward(self.solver, backward)
        z0, start = self._start(inputs, z0)
        try:
            out = self._forward(
                inputs, z0, self.eval_solver if eval_solver is None else eval_solver,
                self.backward if backward is None else backward,
            )  # fmt: skip
        except ShapeChangeError as err:
            # not this layer's state (a solve inside f; a structured state's leaves are checked by name)
            if not isinstance(z0, Tensor) or err.input_shape != tuple(z0.shape):
                raise
            raise ValueError(
                f"f changed the shape: input {err.input_shape}, output {err.output_shape}; FixedPoint started "
                f"from {start}: if the state is shaped like f's output, {_shape_hint(err.output_shape[1:])}"
            ) from err
        except RuntimeError as err:  # torch's shape errors: a matmul of the wrong width inside f
            message = str(err).strip().split("\n")[0]
            if (
                self._started
                or start != "zeros shaped like the first input"
                or isinstance(err, torch.OutOfMemoryError)
                or not any(word in message.lower() for word in ("shape", "size"))
            ):
                raise
            raise ValueError(
                f"f failed on FixedPoint's start, zeros shaped like the first input {tuple(z0.shape)}: {message}; "
                f"if the state has another shape, {_shape_hint(None)}"
            ) from err
        self._started = True
        if self.spectral_radius_iters:  # at the forward's solution; without a solve (S-JFB), at the output
            at = self.last_solution.x if self.last_solution is not None else _tree.detach(out)
            self.last_spectral_radius = estimate_spectral_radius(
                self.f, at, args=inputs, iters=self.spectral_radius_iters
            )
        return out

    def _start(self, inputs: tuple, z0: State | None) -> tuple[State, str]:
        """The start and how it was made (for errors): forward's z0, the layer's z0(*inputs) or state_shape,
        or zeros like the first input."""
        if z0 is not None:
            return z0, "the z0 given to forward"
        if self.z0 is not None:
            return self.z0(*inputs), "z0(*inputs)"
        if not inputs or not isinstance(inputs[0], Tensor):
            raise ValueError(
                "FixedPoint needs z0 or at least one input tensor to shape the zero start "
                "(or state_shape and an input for the batch size)"
            )
        x = inputs[0]
        if self.state_shape is None:
            return torch.zeros_like(x), "zeros shaped like the first input"
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        return x.new_zeros((x.shape[0], *self.state_shape), dtype=dtype), f"zeros of state_shape {self.state_shape}"

    def _forward(self, inputs: tuple, z0: State, eval_solver: SolverFn, backward: BackwardFn) -> State:
        g = lambda z: self.f(z, *inputs)  # noqa: E731
        if not (self.training and torch.is_grad_enabled()):
            self.last_solution = self._solve(eval_solver, g, z0, inputs)
            self.last_info = None
            if not (torch.is_grad_enabled() and _needs_grad(g, self.last_solution.x, inputs, self)):
                return self.last_solution.fx  # f at the best iterate, as the training modes return
            # eval with autograd on (saliency maps, attacks): the backward mode at the eval solution; modes that
            # iterate from z0 themselves (no training solver) would not return it: implicit there
            backward = backward if self.solver is not None else implicit
            return self._differentiate(backward, g, self.last_solution.x, self.last_solution)
        start = z0
        self.last_solution = None
        if self.solver is not None:
            self.last_solution = self._solve(self.solver, g, z0, inputs)
            start = self.last_solution.x
        return self._differentiate(backward, g, start, self.last_solution)

    def _solve(self, solver: SolverFn, g: Callable[[State], State], z0: State, inputs: tuple) -> Solution:
        """``solver`` on z = f(z, *inputs): f and its inputs apart where it takes ``args``, else on g, which
        closes over them. In half precision, a solver whose tolerance is a default (its own, or FixedPoint's
        default solver's) gets at least half precision's (``half_tol``)."""
        known = self._signatures.get(id(solver))
        if known is None or known[0] is not solver:  # reading a signature costs ~80 us: once per solver
            known = (solver, _takes_keyword(solver, "args", unknown=True), _default_tol(solver))
            if len(self._signatures) >= SIGNATURES_KEPT:  # per-call solvers: the oldest goes
                del self._signatures[next(iter(self._signatures))]
            self._signatures[id(solver)] = known
        options = {}
        if known[2] is not None:
            like = z0 if isinstance(z0, Tensor) else _tree.Layout.of(z0, "z0")  # its dtype and device
            tol = _half_tol((like.dtype, autocast_dtype(like.device.type)), self.half_tol)
            if tol is not None:
                options["tol"] = max(tol, known[2])
        return solver(self.f, z0, args=inputs, **options) if known[1] else solver(g, z0, **options)

    def _differentiate(
        self, backward: BackwardFn, g: Callable[[State], State], z: State, solution: Solution | None
    ) -> State:
        """``backward(g, z)``, recording its GradInfo in ``last_info`` where it takes one, and passing the
        forward Solution as ``status`` where it takes that (implicit's fallback for unconverged samples)."""
        self.last_info = GradInfo()
        if backward is self.backward:  # read once, at construction
            takes_info, takes_status = self._backward_takes_info, self._backward_takes_status
        else:  # implicit in eval, or this call's
            takes_info = _takes_keyword(backward, "info", unknown=False)
            takes_status = _takes_keyword(backward, "status", unknown=False)
        options = {}
        if takes_info:
            options["info"] = self.last_info
        if solution is not None and takes_status:
            options["status"] = solution
        return backward(g, z, **options)

    def convergence(self) -> dict[str, float]:
        """The last forward (and its backward, once run) summed up as Python floats, computed now: one host
        sync per call, none per forward. Keys:

        - ``converged``: the fraction of samples whose forward solve converged;
        - ``iterations``, ``max_iterations``: their mean and largest iteration count;
        - ``residual``: the largest forward residual;
        - ``fallbacks``: samples that took implicit's fallback gradient in the backward (the gradient spikes
          avoided), of which ``fallback_forward`` for an unconverged forward, ``fallback_adjoint`` for an
          unconverged adjoint;
        - ``adjoint_iterations``: the adjoint solve's mean iteration count;
        - ``spectral_radius``: the largest estimate of the Jacobian's spectral radius at the solution
          (``spectral_radius=`` steps > 0 only).

        NaN where unknown: no forward solver ran (``solver=None``), no implicit backward has run since the
        last forward (call it after ``loss.backward()``), or no spectral radius is estimated.
        """
        values = dict.fromkeys(
            ("converged", "iterations", "max_iterations", "residual", "fallbacks", "fallback_forward",
             "fallback_adjoint", "adjoint_iterations", "spectral_radius"),
            math.nan,
        )  # fmt: skip
        pending: dict[str, Tensor] = {}
        sol = self.last_solution
        if sol is not None:
            steps = sol.nsteps.double()
            pending.update(converged=sol.converged.double().mean(), iterations=steps.mean(),
                           max_iterations=steps.max(), residual=sol.residual.double().max())  # fmt: skip
        info = self.last_info
        if info is not None and info.fallbacks is not None:
            values.update(fallbacks=float(info.fallbacks), fallback_forward=float(info.fallback_forward),
                          fallback_adjoint=float(info.fallback_adjoint))  # fmt: skip
            if info.backward is not None:
                adjoint = info.backward.nsteps.double().mean()
                pending["adjoint_iterations"] = adjoint.to(sol.nsteps.device) if sol is not None else adjoint
        if self.last_spectral_radius is not None:
            radius = self.last_spectral_radius.double().max()
            pending["spectral_radius"] = radius.to(sol.nsteps.device) if sol is not None else radius
        if pending:
            values.update(zip(pending, torch.stack(list(pending.values())).tolist()))
        return values


def _check_shape(shape) -> tuple[int, ...]:
    """state_shape as a tuple of positive ints (an int is a 1-d shape), or a ValueError naming it."""
    dims = [shape] if as_integer(shape) is not None else shape
    try:
        dims = tuple(as_integer(d) for d in dims)
    except TypeError:
        dims = (None,)
    if None in dims or any(d < 1 for d in dims):
        raise ValueError(f"state_shape must be the state's shape per sample, a tuple of ints, got {shape!r}")
    return dims

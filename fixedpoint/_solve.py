"""The one iteration loop shared by every solver, and the contract a solver implements (:class:`Solver`).

A solver is a small object (optimistix style) that implements three methods and inherits the
defaults of every other hook from :class:`Solver`; the loop calls exactly these, with no probing:

- ``init(x, fx, g, gnorm) -> state``: a state from the first evaluated pair;
- ``step(fn, state, active, frozen) -> (x_next, state)``: the next iterate to evaluate (it may call
  ``fn`` itself, e.g. for Jacobian-vector products); ``frozen`` is the iterate stopped samples keep
  (None when every sample is active): a solver with ``freezes = True`` writes it in its own step
  (Anderson's fused mixing kernel), otherwise the loop does;
- ``update(state, x, fx, g, gnorm) -> state``: absorb the evaluated pair;
- ``residual(state, x, fx) -> (g, ||g||^2, ||f(x)||^2, state)``: the residual pass (default: the
  ``residual`` kernel into a new g; Picard never reads g, Anderson writes g into its history);
- ``reinit(state, x, fx, g, gnorm) -> state``: ``init`` into an existing state's tensors, for a kept
  graph session (default: ``init``);
- ``period``: the iterations after which the Python-side state repeats (None: no graph="solver");
- ``kernels``: the kernel module (None: the loop's choice for the data).

The loop in :func:`solve` owns everything else: evaluating ``f``, residuals in the stopping measure,
per-sample stopping and freezing, the best iterate per sample, the non-finite check, the trace, the
status and the :class:`Solution` (through the ``residual``, ``bookkeep`` and ``best_update`` kernels, or
their PyTorch twins). The best pair is copied lazily: only when a sample stops or its residual rises,
never while it keeps falling. ``graph="solver"`` (f eagerly, the rest of each iteration replayed from
CUDA graphs) lives in ``_graphs`` behind one call. To capture f itself, compile it: ``step =
torch.compile(f, mode="reduce-overhead")`` and solve ``lambda z: step(z).clone()`` (CUDA graph trees
overwrite an output at the next call; the loop keeps earlier outputs).
All tensors inside the loop are flattened to ``(B, D)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, is_dataclass, replace
from functools import partial
from types import ModuleType
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import _graphs, _tree
from . import kernels as kernel_modules
from ._common import (
    Status,
    as_real,
    autocast_dtype,
    check_int,
    check_memory,
    check_positive,
    stat_dtype,
)
from ._graphs import clear_graph_cache
from .kernels.groups import LoopBuffers, Pair, StopRule

__all__ = ["Solution", "Solver", "Status", "clear_graph_cache", "solve"]


RATE_WINDOW = 5  # Solution.rate: the iterations its geometric mean spans


@dataclass
class Solution:
    """What every solver returns. Per-sample fields have the batch as first dimension."""

    x: Tensor  # (B, ...) best iterate per sample (lowest residual), dtype of x0
    fx: Tensor  # (B, ...) f(x): one application of f beyond x, computed anyway to measure the residual
    residual: Tensor  # (B,) residual of x in the stopping measure
    nsteps: Tensor  # (B,) iterations each sample used before it stopped
    status: Tensor  # (B,) int64 codes of Status
    trace: Tensor  # (n, B) residual after every iteration; NaN once a sample has stopped
    nfev: int  # calls of f, including those a solver makes for Jacobian-vector products

    @property
    def converged(self) -> Tensor:
        """(B,) bool, status == CONVERGED."""
        return self.status == Status.CONVERGED

    @property
    def rate(self) -> Tensor:
        """(B,) the observed linear convergence rate per sample: the geometric mean of the residual's factor per
        iteration over the sample's last (up to) RATE_WINDOW traced iterations. Below 1: converging, the
        residual shrinking by that factor per iteration; above 1: growing. NaN where fewer than two
        iterations are traced (the trace keeps a row per iteration run; NaN once a sample has stopped) or
        where a residual there is 0 or not finite."""
        trace = self.trace  # (n, B)
        if len(trace) < 2:
            return trace.new_full((trace.shape[1],), math.nan)
        last = torch.isfinite(trace).sum(dim=0) - 1  # (B,) a sample's residuals are a prefix of its column
        first = (last - RATE_WINDOW).clamp_min(0)
        ratio = trace.gather(0, last.clamp_min(0)[None])[0] / trace.gather(0, first[None])[0]
        steps = (last - first).to(trace.dtype)
        return torch.where(steps > 0, ratio ** (1 / steps.clamp_min(1)), math.nan)

    def statuses(self) -> list[Status]:
        """The per-sample status as a list of :class:`Status` members."""
        return [Status(int(s)) for s in self.status.tolist()]

    def __repr__(self) -> str:
        counts = {s.name: int((self.status == s).sum()) for s in Status}
        counts = {k: v for k, v in counts.items() if v}
        if isinstance(self.x, Tensor):
            x = f"{tuple(self.x.shape)} {self.x.dtype}"
        else:  # a structured state: its leaves' shapes
            leaves = _tree.leaves(self.x)
            shapes = ", ".join(str(tuple(t.shape)) for t in leaves)
            x = f"{type(self.x).__name__} of {len(leaves)} [{shapes}] {leaves[0].dtype}"
        return (
            f"Solution(x={x}, status={counts}, "
            f"max residual={self.residual.max().item():.3g}, "
            f"max nsteps={int(self.nsteps.max())}, nfev={self.nfev})"
        )


class Solver:
    """What the loop calls. Implement ``init``, ``step`` and ``update``; the other hooks have these defaults.
    Tensors are flat, (B, D); norms (B,) in fp32 (fp64 for fp64 data)."""

    freezes: ClassVar[bool] = False  # True: step writes ``frozen`` into stopped samples itself
    period: ClassVar[int | None] = None  # Python-side state repeats after this many iterations (graph="solver")
    kernels: ModuleType | None = None  # None: fixedpoint.kernels.default_for the data

    def init(self, x: Tensor, fx: Tensor, g: Tensor, gnorm: Tensor) -> Any:
        """A state from the start x, f(x), g = f(x) - x and ||g||."""
        raise NotImplementedError

    def step(
        self, fn: Callable[[Tensor], Tensor], state: Any, active: Tensor, frozen: Tensor | None
    ) -> tuple[Tensor, Any]:
        """The next iterate to evaluate, and the state. ``active`` (B,) bool: samples still iterating;
        ``frozen``: what stopped samples keep (None: all active), applied by the loop unless ``freezes``."""
        raise NotImplementedError

    def update(self, state: Any, x: Tensor, fx: Tensor, g: Tensor | None, gnorm: Tensor) -> Any:
        """Absorb the evaluated pair (x, f(x)) with its residual g (None if ``residual`` wrote none)."""
        raise NotImplementedError

    def residual(self, state: Any, x: Tensor, fx: Tensor) -> tuple[Tensor | None, Tensor, Tensor, Any]:
        """g = f(x) - x, ||g||^2 and ||f(x)||^2: one pass of the ``residual`` kernel into a new g."""
        g = torch.empty_like(x)
        gsq, fsq = (self.kernels or kernel_modules.default_for(x)).residual(x, fx, g)
        return g, gsq, fsq, state

    def reinit(self, state: Any, x: Tensor, fx: Tensor, g: Tensor, gnorm: Tensor) -> Any:
        """``init`` into the tensors of ``state`` (a kept graph session's); by default a new ``init``."""
        return self.init(x, fx, g, gnorm)


def _data_ptr(t: Tensor) -> int | None:
    """t's address, or None for tensors without storage (torch.func wrappers inside Newton's jvp)."""
    try:
        return t.data_ptr()
    except RuntimeError:
        return None


class ShapeChangeError(ValueError):
    """f returned another shape than its input's; both are kept (``input_shape``, ``output_shape``), so that
    a caller that made the start (FixedPoint) can say how to give the state's shape."""

    def __init__(self, input_shape: tuple[int, ...], output_shape: tuple[int, ...]):
        self.input_shape, self.output_shape = input_shape, output_shape
        super().__init__(
            f"f changed the shape: input {input_shape}, output {output_shape}; f must map a batch to the same shape"
        )


def check_map_output(out: object, shape: torch.Size, device: torch.device) -> Tensor:
    """f's output, checked: a floating-point tensor of its input's shape, on its input's device."""
    if not isinstance(out, Tensor):
        raise TypeError(f"f must return a tensor, got {type(out).__name__}")
    if not out.is_floating_point():
        raise TypeError(f"f must return a floating-point tensor, got dtype {out.dtype}")
    if out.shape != shape:
        raise ShapeChangeError(tuple(shape), tuple(out.shape))
    if out.device != device:
        raise ValueError(f"f returned a tensor on {out.device}, its input is on {device}; f must keep the device")
    return out


class _CountedMap:
    """f on flat (B, D) tensors: reshapes to the user's shape, passes f's further inputs (``args``), runs it
    under the caller's autocast (``autocast``:
    its dtype, or None; the solver's own ops run without), checks the output, counts calls.

    The loop keeps earlier outputs (the best and the last pair, Anderson's history), so f must
    return a new tensor on every call: an output at the previous call's address (a static
    output buffer, as a CUDA-graphed model has) is a ValueError, not silently overwritten data.
    Returning its own input is fine (a projection at a feasible point); a static buffer that is
    also f's input (Picard with beta = 1 feeds f its last output) cannot be told apart from that.
    """

    def __init__(
        self, f: Callable[..., Tensor], shape: torch.Size, args: tuple = (), autocast: torch.dtype | None = None,
        device: str = "cpu",
    ):  # fmt: skip
        self.f, self.shape, self.args, self.calls = f, shape, args, 0
        self.autocast, self.device_type = autocast, device
        self.last: Tensor | None = None  # the previous output, kept alive so its address cannot be reused

    def release(self) -> None:
        """Drop f, its args and its last output (kept graphs hold this object, not its map)."""
        self.f = self.last = None
        self.args = ()

    def __call__(self, z: Tensor) -> Tensor:
        self.calls += 1
        version = None if torch.is_inference(z) else z._version  # inference tensors keep no version counter
        view = z if z.shape == self.shape else z.view(self.shape)  # (a view costs ~2 us: not for (B, D) states)
        if self.autocast is None:
            out = self.f(view, *self.args)
        else:  # made per call: it takes autocast's cache setting of the moment
            with torch.autocast(self.device_type, dtype=self.autocast):
                out = self.f(view, *self.args)
        if version is not None and z._version != version:
            raise ValueError(
                "f modified its input in place (e.g. z.clamp_() or an in-place activation on z); the solver "
                "still needs that iterate, so f must leave it unchanged: use the out-of-place op (z.clamp())"
            )
        check_map_output(out, self.shape, z.device)
        address = _data_ptr(out)
        if address is not None:
            if self.last is not None and address == self.last.data_ptr() and address != _data_ptr(z):
                raise ValueError(
                    "f returned a tensor at its previous output's address (a static output buffer, as a "
                    "CUDA-graphed model has, or one constant tensor on every call); the solver keeps earlier "
                    "outputs, so f must return a new tensor on every call: return out.clone()"
                )
            self.last = out
        if out.shape == z.shape and out.dtype == z.dtype and out.is_contiguous():
            return out  # already (B, D) rows at stride 1
        return out.reshape(z.shape).to(z.dtype).contiguous()  # the kernels read rows of (B, D) at stride 1


def solve(
    solver: Solver,
    f: Callable[..., Tensor],
    x0: Tensor | Any,
    *,
    args: tuple | None = None,
    tol: float = 1e-4,
    max_iter: int = 50,
    stop: str = "rel",
    divergence: float | None = 1e6,
    check_every: int = 1,
    graph: bool | str = False,
) -> Solution:
    """Run ``solver`` (a :class:`Solver`) on z = f(z, *args) from ``x0`` (B, ...) and return the
    :class:`Solution`. ``x0`` may be a tuple / list / dict (nested) of tensors sharing the batch dimension:
    f gets and returns that structure, the loop iterates their concatenation (B, D), and the Solution's x and
    fx come back in it. The options are the solvers' (``picard``'s docstring); this is how a new solver
    runs on the shared loop (docs/solvers.md, "Writing a solver")."""
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a fixedpoint Solver (a subclass), got {type(solver).__name__}")
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    if args is not None and not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of f's further inputs (or None), got {type(args).__name__}")
    layout = None
    if not isinstance(x0, Tensor):  # a structured state: solved as one (B, D) tensor, returned in its structure
        if not _tree.is_structure(x0):
            raise TypeError(f"x0 must be a torch.Tensor or a tuple / list / dict of them, got {type(x0).__name__}")
        layout = _tree.Layout.of(x0, "x0")
        with torch.no_grad():
            f, x0 = _tree.FlatMap(f, layout), layout.flatten(x0)
    if not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point tensor, got dtype {x0.dtype}")
    if x0.ndim < 1 or x0.shape[0] == 0 or x0.numel() == 0:
        raise ValueError(f"x0 must have a non-empty leading batch dimension, got shape {tuple(x0.shape)}")
    tol = check_positive("tol", tol)
    max_iter = check_int("max_iter", max_iter, 1)
    if stop not in ("rel", "abs"):
        raise ValueError(f"stop must be 'rel' or 'abs', got {stop!r}")
    if divergence is not None:
        number = as_real(divergence)
        if number is None or not number > 1:
            raise ValueError(f"divergence must be a number > 1 or None, got {divergence!r}")
        divergence = number
    check_every = check_int("check_every", check_every, 1)
    if not isinstance(graph, (bool, str)):
        kind = f"{type(graph).__module__}.{type(graph).__qualname__}".removeprefix("builtins.")
        raise TypeError(f"graph must be False or 'solver', got {graph!r} ({kind})")
    if graph is True:
        raise ValueError(
            "graph=True (f captured with the loop) was removed in fixedpoint 0.2: compile f instead, "
            "torch.compile(f, mode='reduce-overhead') (CUDA graphs of f, re-recorded for new shapes) with its "
            "output cloned (the next call overwrites it), and "
            "pass graph='solver' for the solver's own work in one graph launch per iteration"
        )
    if graph not in _graphs.GRAPH_MODES:
        raise ValueError(f"graph must be False or 'solver', got {graph!r}")
    if graph and not _graphs.GRAPHS.supports(x0):
        raise ValueError(f"graph={graph!r} captures a CUDA graph and needs CUDA tensors, got x0 on {x0.device}")
    if graph and solver.period is None:
        raise ValueError(f"graph={graph!r} is not supported by {type(solver).__name__} (it syncs with the host)")

    kernels = solver.kernels or kernel_modules.default_for(x0)
    if graph and kernels is kernel_modules.host:  # NumPy's work would run once, at capture: graphs take the twins
        kernels = kernel_modules.reference
        if solver.kernels is kernel_modules.host and is_dataclass(solver):  # the solver's own kernels too
            solver = replace(solver, kernels=kernels)
    f_autocast = autocast_dtype(x0.device.type)  # f runs under it; norms, Gram matrices, small solves never do
    own_precision = torch.autocast(x0.device.type, enabled=False) if f_autocast is not None else nullcontext()
    with torch.no_grad(), own_precision:
        sol = _loop(solver, f, args, x0.detach(), tol=tol, max_iter=max_iter, stop=stop, divergence=divergence,
                    check_every=check_every, graph=graph, kernels=kernels, f_autocast=f_autocast)  # fmt: skip
    return sol if layout is None else layout.solution(sol)


class _LaggedCount:
    """The device's count of active samples, read one iteration after it is asked for: its copy to the
    host is queued without waiting (pinned memory, an event), so while the host waits for it the device
    has the next iteration queued and never idles. On a CPU the copy is immediate; the lag is the same."""

    def __init__(self, device: torch.device):
        cuda = device.type == "cuda"
        self.device = device
        self.host = torch.zeros((), dtype=torch.long, pin_memory=cuda)
        self.event = torch.cuda.Event() if cuda else None
        self.asked = False

    def ask(self, count: Tensor) -> None:
        """Queue the copy of ``count`` (0-d, on the device)."""
        self.host.copy_(count, non_blocking=True)
        if self.event is not None:  # behind the copy: on the stream of the count's device, not the current device
            self.event.record(torch.cuda.current_stream(self.device))
        self.asked = True

    def answer(self) -> int | None:
        """The count asked for last (waiting for its copy), or None when none was asked for since."""
        if not self.asked:
            return None
        if self.event is not None:
            self.event.synchronize()
        self.asked = False
        return int(self.host)


TRACE_ROWS = 64  # the eager loop's first trace rows (then doubled as iterations need them, up to max_iter)


def _new_buffers(x: Tensor, max_iter: int, graph: bool | str) -> LoopBuffers:
    """The loop's in-place tensors for iterates like x (B, D), uninitialised:
    ``_Loop.start`` fills them (a kept graph session brings its own instead). The trace has a row per
    iteration and a last, scratch row: the graph modes write it from the device at fixed addresses, so all
    max_iter + 1 rows are allocated (and checked against the memory available); the eager loop grows it."""
    batch, sdt, device = x.shape[0], stat_dtype(x.dtype), x.device
    rows = max_iter + 1 if graph else min(max_iter, TRACE_ROWS) + 1
    if graph:
        nbytes = rows * batch * sdt.itemsize
        check_memory("max_iter", max_iter, nbytes, f"the static trace ({rows}, {batch}) of graph={graph!r}", device)
    vector = partial(torch.empty, batch, device=device)
    return LoopBuffers(
        gnorm0=vector(dtype=sdt),
        status=vector(dtype=torch.long),
        best_res=vector(dtype=sdt),
        pending=vector(dtype=torch.bool),
        nsteps=vector(dtype=torch.long),
        trace=torch.empty(rows, batch, dtype=sdt, device=device),
        done=torch.empty((), dtype=torch.long, device=device),
        best_x=torch.empty_like(x),
        best_fx=torch.empty_like(x),
    )


class _Loop:
    """One solve: the per-sample accounting every loop mode shares (``advance`` then ``absorb`` is one
    iteration), the eager loop (``run_eager``) and the Solution (``finish``); graph="solver" replays
    ``absorb`` and ``advance`` from graphs (``_graphs.solve``).

    A graph="solver" session's graphs call into the loop that captured them, also in later solves, so
    a loop holds no reference to x0 (only to tensors the session owns), and f is released when the
    session is kept.
    """

    def __init__(
        self, solver: Solver, fn: _CountedMap, buffers: LoopBuffers, rule: StopRule, *, check_every: int,
        graph: bool | str, kernels: Any,
    ):  # fmt: skip
        self.solver, self.fn, self.kernels = solver, fn, kernels
        self.buffers, self.rule, self.max_iter = buffers, rule, rule.max_iter
        self.check_every, self.graph = check_every, graph
        self.device = buffers.best_x.device
        self.lagged = _LaggedCount(self.device) if check_every > 1 else None
        # carried from one iteration to the next (rebound to static buffers by the graph modes)
        self.state: Any = None
        self.active: Tensor | None = None  # (B,) bool: samples still iterating
        self.prev: Pair | None = None  # the last evaluated pair: best_update copies it when it was the best

    def start(self, x: Tensor, fx: Tensor, reuse: Any = None) -> int:
        """Take the start x and f(x) (B, D) through the same per-sample accounting as every iteration
        (status, best residual: NaN for a non-finite start), its residual into the trace's scratch row
        and its step into a throwaway count. ``reuse``: a kept session's solver state, re-initialised in
        place when the solver can (``reinit``). Returns the active count (a sync)."""
        b = self.buffers
        g = torch.empty_like(x)
        gsq, fsq = self.kernels.residual(x, fx, g)  # (B,), (B,): one pass over (x, f(x)), g written
        torch.sqrt(gsq, out=b.gnorm0)
        b.status.fill_(Status.MAX_ITER)
        b.best_res.fill_(math.nan)
        b.trace.fill_(math.nan)
        for count in (b.pending, b.nsteps, b.done):
            count.zero_()
        throwaway = replace(b, pending=torch.zeros_like(b.pending), nsteps=torch.zeros_like(b.nsteps))
        everyone, scratch_row = torch.ones_like(b.pending), len(b.trace) - 1
        gnorm, self.active, _, counts = self.kernels.bookkeep(gsq, fsq, everyone, throwaway, self.rule, scratch_row)
        b.best_x.copy_(x)  # the start, also for samples that never improve on it
        b.best_fx.copy_(fx)
        self.prev = Pair(x, fx)
        if reuse is not None:
            self.state = self.solver.reinit(reuse, x, fx, g, gnorm)
        else:
            self.state = self.solver.init(x, fx, g, gnorm)
        return int(counts[0])

    def advance(self, all_active: bool, step_map: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """The solver's next iterate (B, D) to evaluate; stopped samples sit at their best iterate
        (f always sees the whole batch). ``step_map``: the f a solver's step may call (default f)."""
        step_map = self.fn if step_map is None else step_map
        frozen = None if all_active else self.buffers.best_x
        x, self.state = self.solver.step(step_map, self.state, self.active, frozen)
        if frozen is None or self.solver.freezes:
            return x
        return torch.where(self.active[:, None], x, frozen)

    def absorb(self, x: Tensor, fx: Tensor, n: int | None, sync: bool) -> tuple[int | None, Tensor]:
        """Everything after evaluating (x, f(x)): residuals, per-sample accounting, the lazy best copy and
        the solver's update. ``n``: the iteration's index, or None inside a CUDA graph (the device counts).

        ``sync``: one host sync for the counts of active samples (returned) and of best pairs to copy
        (no launch when there are none: while every residual falls). Also returns the counts (2,).
        """
        g, gsq, fsq, self.state = self.solver.residual(self.state, x, fx)  # (B, D) or None, (B,), (B,): one pass
        # status, best residual, step counts, the trace row and what to copy as best, in one go
        gnorm, self.active, take, counts = self.kernels.bookkeep(gsq, fsq, self.active, self.buffers, self.rule, n)
        n_active, n_copies = counts.tolist() if sync else (None, -1)  # -1: unknown without a sync
        new = Pair(x, fx)
        if n_copies:  # copies only samples whose best pair would otherwise be lost
            self.kernels.best_update(self.buffers, new, self.prev, take)
        self.prev = new
        self.state = self.solver.update(self.state, x, fx, g, gnorm)
        return n_active, counts

    def iterate(self, n: int | None, sync: bool, all_active: bool) -> tuple[int | None, Tensor]:
        """One eager iteration: the count of active samples when ``sync``, and the counts (2,) on the device."""
        x = self.advance(all_active)
        return self.absorb(x, self.fn(x), n, sync)

    def check(self, n: int, counts: Tensor, n_active: int) -> int:
        """After iteration ``n`` (queued): the count of active samples the host knows. With check_every 1,
        this iteration's (a sync). Otherwise the one asked for one iteration ago (``n_active`` when none
        was), and every check_every iterations a new ask: the host waits for iteration n - 1 only."""
        if self.lagged is None:
            return int(counts[0])
        answer = self.lagged.answer()
        if (n + 1) % self.check_every == 0:
            self.lagged.ask(counts[0])
        return n_active if answer is None else answer

    def run_eager(self, n: int, n_active: int) -> int:
        """Iterate eagerly from iteration n until max_iter or no sample is active; returns the iterations run.
        Host syncs: with check_every 1, one per iteration (how many samples are active); otherwise the count
        is asked for every check_every iterations and read one iteration later (``check``), and everything
        is masked on the device in between."""
        while n < self.max_iter and n_active:
            if n == len(self.buffers.trace):
                self.grow_trace()
            if self.check_every == 1:
                n_active, _ = self.iterate(n, sync=True, all_active=n_active == len(self.active))
            else:
                _, counts = self.iterate(n, sync=False, all_active=False)
                n_active = self.check(n, counts, n_active)
            n += 1
        return n

    def grow_trace(self) -> None:
        """Twice the trace's rows (at most max_iter + 1), NaN where not written yet: the eager loop's trace
        follows the iterations run, not max_iter."""
        rows, batch = self.buffers.trace.shape
        trace = self.buffers.trace.new_full((min(2 * rows, self.max_iter + 1), batch), math.nan)  # (rows', B)
        trace[:rows] = self.buffers.trace
        self.buffers.trace = trace

    def finish(self, n: int, shape: torch.Size) -> Solution:
        """The Solution after n iterations, in the start's ``shape``: samples still iterating at the end
        whose last pair was their best take it (TAKE_NEW == 1)."""
        b = self.buffers
        self.kernels.best_update(b, self.prev, self.prev, b.pending.to(torch.int8))
        if self.check_every > 1 or self.graph:  # drop the rows run after every sample stopped
            n = int(b.nsteps.max())
        return Solution(
            x=b.best_x.view(shape),
            fx=b.best_fx.view(shape),
            residual=b.best_res,
            nsteps=b.nsteps,
            status=b.status,
            trace=b.trace[:n],
            nfev=self.fn.calls,
        )


def _loop(
    solver: Solver, f, args: tuple | None, x0: Tensor, *, tol, max_iter, stop, divergence, check_every, graph, kernels,
    f_autocast: torch.dtype | None,
) -> Solution:  # fmt: skip
    fn = _CountedMap(f, x0.shape, () if args is None else args, f_autocast, x0.device.type)
    x = x0.reshape(x0.shape[0], -1).clone(memory_format=torch.contiguous_format)  # (B, D), rows at stride 1
    fx = fn(x)  # before a kept session is taken: if f fails, it stays kept; a solve inside f may use it
    key = _graphs.session_key(graph, x0, (solver, kernels, tol, max_iter, stop, divergence))
    session = _graphs.take_graphs(key, x.device)
    rule = StopRule(tol, max_iter, relative=stop == "rel", divergence=math.inf if divergence is None else divergence)
    buffers = _new_buffers(x, max_iter, graph) if session is None else session.buffers
    loop = _Loop(solver, fn, buffers, rule, check_every=check_every, graph=graph, kernels=kernels)
    n_active = loop.start(x, fx, reuse=None if session is None else session.state)
    del x, fx  # from here on held as the last evaluated pair, which the graphs rebind to their buffers
    if graph:
        return _graphs.solve(loop, session, key, n_active, x0.shape)
    return loop.finish(loop.run_eager(0, n_active), x0.shape)

"""The one iteration loop shared by every solver.

A solver is a small object with three methods (optimistix style):

- ``init(x, fx, g, gnorm) -> state``: a state from the first evaluated pair;
- ``step(fn, state, active) -> (x_next, state)``: the next iterate to evaluate
  (it may call ``fn`` itself, e.g. for Jacobian-vector products). A solver
  with ``freezes = True`` also takes ``frozen`` (the iterate stopped samples
  must keep, or None when every sample is active) and applies it itself, in
  the same pass as its step (Anderson's fused mixing kernel);
- ``update(state, x, fx, g, gnorm) -> state``: absorb the evaluated pair.

Optionally ``residual(state, x, fx) -> (g, ||g||^2, ||f(x)||^2, state)`` is the
solver's own residual pass: Picard never reads g (None: not written), Anderson
writes g straight into its history with f(x) and the new Gram row in the same
pass. Without it the loop runs the ``residual`` kernel into a new g.

A solver with a ``period`` (the iterations after which its Python-side state,
e.g. Anderson's ring slot, repeats) and no host syncs can run with
``graph=True``: its iterations are captured in a CUDA graph and replayed; and
with ``graph="solver"``, where f runs eagerly and the rest of each iteration is
replayed from graphs kept for later solves (its step must not call ``fn``).

The loop in :func:`solve` owns everything else: evaluating ``f``, residuals in
the stopping measure, per-sample stopping and freezing, the best iterate per
sample, the non-finite check, the trace, the status and the :class:`Solution`
(through the ``residual``, ``bookkeep`` and ``best_update`` kernels, or their
PyTorch twins). The best pair is copied lazily: only when a sample stops or
its residual rises, never while it keeps falling.
All tensors inside the loop are flattened to ``(B, D)``.
"""

from __future__ import annotations

import enum
import math
import numbers
import operator
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields, replace
from functools import partial
from typing import Any, ClassVar, NamedTuple, Protocol

import torch
from torch import Tensor

__all__ = ["Solution", "Solver", "Status", "clear_graph_cache", "solve"]


class Status(enum.IntEnum):
    """Why a sample stopped iterating (stored per sample in ``Solution.status``)."""

    CONVERGED = 0  #: residual <= tol
    MAX_ITER = 1  #: max_iter reached without converging
    DIVERGED = 2  #: ||f(x) - x|| grew beyond ``divergence`` times its start
    NONFINITE = 3  #: f produced NaN/Inf; the sample keeps its last finite iterate


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

    def statuses(self) -> list[Status]:
        """The per-sample status as a list of :class:`Status` members."""
        return [Status(int(s)) for s in self.status.tolist()]

    def __repr__(self) -> str:
        counts = {s.name: int((self.status == s).sum()) for s in Status}
        counts = {k: v for k, v in counts.items() if v}
        return (
            f"Solution(x={tuple(self.x.shape)} {self.x.dtype}, status={counts}, "
            f"max residual={self.residual.max().item():.3g}, "
            f"max nsteps={int(self.nsteps.max())}, nfev={self.nfev})"
        )


class Solver(Protocol):
    """The three methods the loop calls; see the module docstring."""

    def init(self, x: Tensor, fx: Tensor, g: Tensor, gnorm: Tensor) -> Any: ...

    def step(self, fn: Callable[[Tensor], Tensor], state: Any, active: Tensor) -> tuple[Tensor, Any]: ...

    def update(self, state: Any, x: Tensor, fx: Tensor, g: Tensor, gnorm: Tensor) -> Any: ...


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision for norms, Gram matrices and small solves: fp64 for fp64 data, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_norms(v: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, D) -> (B,) Euclidean norms accumulated in ``dtype``."""
    return torch.linalg.vector_norm(v, dim=1, dtype=dtype)


def _data_ptr(t: Tensor) -> int | None:
    """t's address, or None for tensors without storage (torch.func wrappers inside Newton's jvp)."""
    try:
        return t.data_ptr()
    except RuntimeError:
        return None


class _CountedMap:
    """f on flat (B, D) tensors: reshapes to the user's shape, checks it, counts calls.

    The loop keeps earlier outputs (the best and the last pair, Anderson's history), so f must
    return a new tensor on every call: an output at the previous call's address (a static
    output buffer, as a CUDA-graphed model has) is a ValueError, not silently overwritten data.
    Returning its own input is fine (a projection at a feasible point); a static buffer that is
    also f's input (Picard with beta = 1 feeds f its last output) cannot be told apart from that.
    """

    def __init__(self, f: Callable[[Tensor], Tensor], shape: torch.Size):
        self.f, self.shape, self.calls = f, shape, 0
        self.last: Tensor | None = None  # the previous output, kept alive so its address cannot be reused

    def release(self) -> None:
        """Drop f and its last output (kept graphs hold this object, not its map)."""
        self.f = self.last = None

    def __call__(self, z: Tensor) -> Tensor:
        self.calls += 1
        version = None if torch.is_inference(z) else z._version  # inference tensors keep no version counter
        out = self.f(z.view(self.shape))
        if version is not None and z._version != version:
            raise ValueError(
                "f modified its input in place (e.g. z.clamp_() or an in-place activation on z); the solver "
                "still needs that iterate, so f must leave it unchanged: use the out-of-place op (z.clamp())"
            )
        if not isinstance(out, Tensor):
            raise TypeError(f"f must return a tensor, got {type(out).__name__}")
        if not out.is_floating_point():
            raise TypeError(f"f must return a floating-point tensor, got dtype {out.dtype}")
        if out.shape != self.shape:
            raise ValueError(
                f"f changed the shape: input {tuple(self.shape)}, output {tuple(out.shape)}; "
                "f must map a batch to the same shape"
            )
        address = _data_ptr(out)
        if address is not None:
            if self.last is not None and address == self.last.data_ptr() and address != _data_ptr(z):
                raise ValueError(
                    "f returned a tensor at its previous output's address (a static output buffer, as a "
                    "CUDA-graphed model has, or one constant tensor on every call); the solver keeps earlier "
                    "outputs, so f must return a new tensor on every call: return out.clone()"
                )
            self.last = out
        return out.reshape(z.shape).to(z.dtype).contiguous()  # the kernels read rows of (B, D) at stride 1


def as_real(value: object) -> float | None:
    """A Python, NumPy or 0-d tensor real number as a float; None for anything else (bools included)."""
    if isinstance(value, Tensor):
        ok = value.ndim == 0 and value.dtype != torch.bool and not value.is_complex()
        return float(value) if ok else None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def as_integer(value: object) -> int | None:
    """A Python, NumPy or 0-d integer tensor as an int; None for anything else (bools and floats included)."""
    if isinstance(value, bool) or (isinstance(value, Tensor) and value.dtype == torch.bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_positive(name: str, value: float) -> float:
    """``value`` as a float, or a ValueError naming it: a positive finite number."""
    number = as_real(value)
    if number is None or not number > 0 or not math.isfinite(number):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return number


def check_int(name: str, value: int, minimum: int) -> int:
    """``value`` as an int, or a ValueError naming it: an integer >= minimum."""
    number = as_integer(value)
    if number is None or number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return number


def check_interval(name: str, value: float, low: float, high: float) -> float:
    """``value`` as a float with low < value <= high, or a ValueError naming it."""
    number = as_real(value)
    if number is None or not low < number <= high:
        raise ValueError(f"{name} must be in ({low}, {high}], got {value!r}")
    return number


def solve(
    solver: Solver,
    f: Callable[[Tensor], Tensor],
    x0: Tensor,
    *,
    tol: float,
    max_iter: int,
    stop: str,
    divergence: float | None,
    check_every: int = 1,
    graph: bool | str = False,
    kernels=None,
) -> Solution:
    """Run ``solver`` on z = f(z) from ``x0`` (B, ...) and return the :class:`Solution`."""
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    if not isinstance(x0, Tensor):
        raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
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
        raise TypeError(f"graph must be a bool or 'solver', got {type(graph).__name__}")
    if graph not in GRAPH_MODES:
        raise ValueError(f"graph must be False, True or 'solver', got {graph!r}")
    if graph and not GRAPHS.supports(x0):
        raise ValueError(f"graph={graph!r} captures a CUDA graph and needs CUDA tensors, got x0 on {x0.device}")
    if graph and not hasattr(solver, "period"):
        raise ValueError(f"graph={graph!r} is not supported by {type(solver).__name__} (it syncs with the host)")

    from . import kernels as kernel_modules

    kernels = kernels or kernel_modules.reference
    with torch.no_grad():
        return _loop(solver, f, x0.detach(), tol=tol, max_iter=max_iter, stop=stop, divergence=divergence,
                     check_every=check_every, graph=graph, kernels=kernels)  # fmt: skip


class CapturePool(NamedTuple):
    """A CUDA graph memory pool and the side stream its graphs are captured on."""

    handle: Any  # torch.cuda.graph_pool_handle()
    stream: Any  # torch.cuda.Stream


class CudaGraphs:
    """What the graph loops need from CUDA: a side stream for warm-up, a memory pool that captures can
    share, and capture into a replayable graph."""

    @staticmethod
    def supports(x: Tensor) -> bool:
        return x.is_cuda

    @staticmethod
    @contextmanager
    def warmup_stream(device: torch.device):
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            yield
        torch.cuda.current_stream(device).wait_stream(side)

    @staticmethod
    def memory_pool(device: torch.device) -> CapturePool:
        """What the captures of one graph=True solve or one graph="solver" session share: a memory pool
        (graphs replayed in the order they were captured may share memory) and the stream they are
        captured on (the allocator reuses a freed block on its own stream only).

        Empties the allocator's cache first, before the first capture into the pool: that is what returns
        the pools of dropped graphs to the driver, and an allocation that fails inside a capture cannot
        retry after it. (A kept session may capture its last positions in a later solve, without this.)
        """
        torch.cuda.empty_cache()
        return CapturePool(torch.cuda.graph_pool_handle(), torch.cuda.Stream(device=device))

    @staticmethod
    def capture(body: Callable[[], None], device: torch.device, pool: CapturePool) -> Callable[[], None]:
        """Record ``body`` on ``pool``'s stream into its memory (nothing runs yet) and return the replay.

        capture_begin/capture_end rather than ``torch.cuda.graph``, which also synchronizes and empties
        the allocator's cache before each capture: f's next eager call would allocate from the driver again.
        """
        handle, side = pool
        graph = torch.cuda.CUDAGraph()
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            graph.capture_begin(handle)
            try:
                body()
            except BaseException:
                with suppress(RuntimeError):  # the capture is invalid; end it so the stream can be used again
                    graph.capture_end()
                raise
            graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(side)
        return graph.replay


GRAPHS = CudaGraphs()  # tests swap in an eager stand-in to run the graph paths' logic on CPU
GRAPH_CHUNK = 4  # iterations per captured chunk of graph=True, at least (rounded up to whole solver periods)
GRAPH_MODES = (False, True, "solver")


def _state_tensors(state: Any) -> dict[str, Tensor]:
    """The tensor fields of a solver state dataclass."""
    return {f.name: getattr(state, f.name) for f in fields(state) if isinstance(getattr(state, f.name), Tensor)}


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


class _StaticBuffers:
    """Tensors carried from one graph replay to the next, in fixed buffers: one dense copy per distinct
    tensor (two names for one tensor share it). Copies, so that nothing f returned is written into."""

    def __init__(self, values: dict[str, Tensor]):
        buffers: dict[int, Tensor] = {}
        for v in values.values():
            if id(v) not in buffers:
                buffers[id(v)] = v.clone(memory_format=torch.contiguous_format)
        self.tensors = {name: buffers[id(v)] for name, v in values.items()}

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def copy_in(self, values: dict[str, Tensor]) -> None:
        """Write a replay's results into the buffers the next replay reads (each shared buffer once)."""
        sources: dict[int, Tensor] = {}  # buffer -> the value copied into it
        for name, value in values.items():
            target = self.tensors[name]
            if id(target) in sources:  # shared by two names: they must still hold the same tensor
                if sources[id(target)] is not value:
                    raise RuntimeError(f"graph: {name} no longer aliases the tensor it shared a buffer with")
                continue
            sources[id(target)] = value
            if value is not target:
                target.copy_(value)


def _position_input(static: _StaticBuffers, outputs: list[tuple[Tensor, ...]], j: int) -> Tensor:
    """The iterate position j evaluates: the static one at a period's start, else the previous output."""
    return static["next_x"] if j == 0 else outputs[j - 1][0]


@dataclass
class _SolverGraphs:
    """graph="solver": one period's graphs and every buffer they read and write. f is not captured, so
    any later solve with the same key (solver, shapes, options) copies its start into these buffers and
    replays the same graphs: no warm-up, no capture."""

    buffers: dict[str, Tensor]  # updated in place: the start's residual and the per-sample accounting
    static: _StaticBuffers  # what a period's first position reads: the next iterate, the carried tensors
    fx_buffers: tuple[Tensor, Tensor]  # f(x) of position j goes into fx_buffers[j % 2]
    period: int  # lcm(solver period, 2)
    capture: Callable[[int], Callable[[], None]]  # position -> its replay, capturing it (never refers to self)
    outputs: list[tuple[Tensor, ...]]  # per captured position: x_{j+1}, counts, x_j, f(x_j)
    replays: list[Callable[[], None]] = field(default_factory=list)  # captured positions, in order
    finished: Any = None  # CUDA: an event behind the last solve's work, which the next one waits for

    BUFFERS: ClassVar[tuple[str, ...]] = (
        "gnorm0", "status", "best_res", "pending", "nsteps", "trace", "done", "best_x", "best_fx"
    )  # fmt: skip

    def restart(self, start: dict[str, Tensor], carried: dict[str, Tensor], device: torch.device) -> None:
        """A later solve: its start (``BUFFERS``) and its carried tensors, next iterate included, into the
        kept buffers, after the last solve's work (which may have run on another stream)."""
        if self.finished is not None:
            torch.cuda.current_stream(device).wait_event(self.finished)
        for name in self.BUFFERS:
            self.buffers[name].copy_(start[name])
        self.static.copy_in(carried)

    def run(
        self, fn: Callable[[Tensor], Tensor], n: int, n_active: int, max_iter: int,
        check: Callable[[int, Tensor, int], int],
    ) -> tuple[int, int, Tensor, Tensor]:  # fmt: skip
        """Iterate from position 0 until max_iter or no sample is active: f eagerly, then one replay.
        ``check(n, counts, n_active)`` gives the active count the host knows after iteration n. Returns
        the iterations run, the active count and the last evaluated pair."""
        j = 0
        while n < max_iter and n_active:
            self.fx_buffers[j % 2].copy_(fn(_position_input(self.static, self.outputs, j)))
            if len(self.replays) == j:  # the first pass through a position captures it
                self.replays.append(self.capture(j))
            self.replays[j]()
            n_active = check(n, self.outputs[j][1], n_active)
            n, j = n + 1, (j + 1) % self.period
        return n, n_active, *self.outputs[j - 1][2:]

    def result(self, solution: Solution, device: torch.device) -> Solution:
        """``solution``, read from the kept buffers, copied out of them (the next solve overwrites them)."""
        copies = {f.name: getattr(solution, f.name).clone() for f in fields(solution) if f.name != "nfev"}
        if device.type == "cuda":  # the next solve waits for these copies
            self.finished = torch.cuda.Event()
            self.finished.record(torch.cuda.current_stream(device))
        return replace(solution, **copies)


def _map_not_captured(z: Tensor) -> Tensor:
    raise RuntimeError(
        "graph='solver' does not capture f, so the solver's step may not call it (Jacobian-vector products): "
        "use graph=False or graph=True"
    )


GRAPH_CACHE_SIZE = 4  # graph="solver" sessions kept (least recently used dropped)
_graph_cache: OrderedDict[tuple, _SolverGraphs] = OrderedDict()


def clear_graph_cache() -> None:
    """Drop every graph="solver" session kept for later solves, and return the memory it held to the
    device (a dead graph's memory pool is freed only when the allocator's cache is emptied)."""
    _graph_cache.clear()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _keep_graphs(key: tuple, session: _SolverGraphs) -> None:
    _graph_cache[key] = session
    _graph_cache.move_to_end(key)
    while len(_graph_cache) > GRAPH_CACHE_SIZE:
        _graph_cache.popitem(last=False)


def _loop(solver: Solver, f, x0: Tensor, *, tol, max_iter, stop, divergence, check_every, graph, kernels) -> Solution:
    batch = x0.shape[0]
    sdt = stat_dtype(x0.dtype)
    fn = _CountedMap(f, x0.shape)
    x = x0.reshape(batch, -1).clone(memory_format=torch.contiguous_format)  # (B, D), rows at stride 1
    device = x.device  # what the nested functions use: kept graphs must not keep x alive

    nsteps = torch.zeros(batch, dtype=torch.long, device=device)
    trace = torch.full((max_iter + 1, batch), float("nan"), dtype=sdt, device=device)  # last row: scratch
    done = torch.zeros((), dtype=torch.long, device=device)  # iterations run, counted on the device (graph)
    divergence = math.inf if divergence is None else float(divergence)

    fx = fn(x)
    g = torch.empty_like(x)
    gsq, fsq = kernels.residual(x, fx, g)  # (B,), (B,): one pass over (x, f(x)), g written
    gnorm0 = gsq.sqrt()
    # the start goes through the same per-sample accounting as every iteration (status, best residual:
    # NaN for a non-finite start), its residual into the trace's scratch row, its step into a throwaway count
    status = torch.full_like(nsteps, Status.MAX_ITER)  # (B,) int64 codes
    best_res = torch.full_like(gnorm0, torch.nan)
    pending = torch.zeros_like(status, dtype=torch.bool)  # (B,) the best pair is the newest, not copied yet
    gnorm, active, _, counts = kernels.bookkeep(
        gsq, fsq, gnorm0, status, torch.ones_like(pending), best_res, torch.zeros_like(pending),
        torch.zeros_like(nsteps), trace, max_iter, done, tol, divergence, stop == "rel", max_iter,
    )  # fmt: skip
    best_x, best_fx = x.clone(), fx.clone()  # the start, also for samples that never improve on it
    prev_x, prev_fx = x, fx  # the last evaluated pair: best_update copies it when it was the best
    state = solver.init(x, fx, g, gnorm)
    freezes = getattr(solver, "freezes", False)
    own_residual = getattr(solver, "residual", None)

    def advance(all_active: bool, step_map: Callable[[Tensor], Tensor] = fn) -> Tensor:
        """The solver's next iterate (B, D) to evaluate; stopped samples sit at their best iterate
        (f always sees the whole batch). ``step_map``: the f a solver's step may call."""
        nonlocal state
        if freezes:
            x, state = solver.step(step_map, state, active, None if all_active else best_x)
            return x
        x_next, state = solver.step(step_map, state, active)
        return x_next if all_active else torch.where(active[:, None], x_next, best_x)

    def absorb(x: Tensor, fx: Tensor, n: int | None, sync: bool) -> tuple[int | None, Tensor]:
        """Everything after evaluating (x, f(x)): residuals, per-sample accounting, the lazy best copy and
        the solver's update. ``n``: the iteration's index, or None inside a CUDA graph (the device counts).

        ``sync``: one host sync for the counts of active samples (returned) and of best pairs to copy
        (no launch when there are none: while every residual falls). Also returns the counts (2,).
        """
        nonlocal active, state, prev_x, prev_fx
        if own_residual is not None:  # (B, D) or None, (B,), (B,): one pass over (x, f(x)), the solver's
            g, gsq, fsq, state = own_residual(state, x, fx)
        else:
            g = torch.empty_like(x)
            gsq, fsq = kernels.residual(x, fx, g)
        # status, best residual, step counts, the trace row and what to copy as best, in one go
        gnorm, active, take, counts = kernels.bookkeep(
            gsq, fsq, gnorm0, status, active, best_res, pending, nsteps, trace, n, done, tol, divergence,
            stop == "rel", max_iter,
        )  # fmt: skip
        n_active, n_copies = counts.tolist() if sync else (None, -1)  # -1: unknown without a sync
        if n_copies:  # copies only samples whose best pair would otherwise be lost
            kernels.best_update(best_x, best_fx, x, fx, prev_x, prev_fx, take)
        prev_x, prev_fx = x, fx
        state = solver.update(state, x, fx, g, gnorm)
        return n_active, counts

    def iterate(n: int | None, sync: bool, all_active: bool) -> tuple[int | None, Tensor]:
        """One eager iteration: the count of active samples when ``sync``, and the counts (2,) on the device."""
        x = advance(all_active)
        return absorb(x, fn(x), n, sync)

    lagged = _LaggedCount(device) if check_every > 1 else None

    def check(n: int, counts: Tensor, n_active: int) -> int:
        """After iteration ``n`` (queued): the count of active samples the host knows. With check_every 1,
        this iteration's (a sync). Otherwise the one asked for one iteration ago (``n_active`` when none
        was), and every check_every iterations a new ask: the host waits for iteration n - 1 only."""
        if lagged is None:
            return int(counts[0])
        answer = lagged.answer()
        if (n + 1) % check_every == 0:
            lagged.ask(counts[0])
        return n_active if answer is None else answer

    def carried() -> dict[str, Tensor]:
        """What one iteration hands the next, besides the tensors updated in place."""
        state_tensors = {f"state.{name}": value for name, value in _state_tensors(state).items()}
        return {"active": active, "prev_x": prev_x, "prev_fx": prev_fx, **state_tensors}

    def period_start() -> dict[str, Tensor]:
        """What a graph="solver" period's first position reads: the next iterate and the carried tensors."""
        return {"next_x": advance(all_active=False), **carried()}

    def bind(static: _StaticBuffers) -> None:
        """Point the loop's carried tensors at their static buffers."""
        nonlocal active, prev_x, prev_fx, state
        active, prev_x, prev_fx = static["active"], static["prev_x"], static["prev_fx"]
        state = replace(state, **{name: static[f"state.{name}"] for name in _state_tensors(state)})

    def capture(body: Callable[[], None], pool: Any) -> Callable[[], None]:
        try:
            return GRAPHS.capture(body, device, pool)
        except RuntimeError as err:
            what = "the iteration" if graph is True else "the solver's part of the iteration"
            advice = (
                "; f must be capturable (static shapes, no host syncs such as .item() or printing, no CPU tensors)"
                if graph is True
                else ""
            )
            raise RuntimeError(f"graph={graph!r} could not capture {what} in a CUDA graph{advice}: {err}") from err

    def run_captured(n: int, n_active: int) -> tuple[int, int]:
        """graph=True: chunks of whole solver periods (Anderson's ring slot repeats), f included, captured
        once and replayed; at least GRAPH_CHUNK iterations per chunk, so that copying its results back
        costs little per iteration. Convergence is checked every `replays` chunks (check_every rounded
        up). Returns the iterations run and the active count."""
        chunk = solver.period * math.ceil(GRAPH_CHUNK / solver.period)
        replays = math.ceil(check_every / chunk)
        # status, best_res, pending, nsteps, trace, best_x, best_fx are updated in place; the rest is
        # copied into static buffers after each chunk
        static = _StaticBuffers(carried())
        bind(static)
        last_counts: list[Tensor] = []  # the chunk's last counts (2,): convergence is read from them

        def run_chunk() -> None:
            for _ in range(chunk):
                _, counts = iterate(None, sync=False, all_active=False)
            static.copy_in(carried())
            bind(static)
            last_counts[:] = [counts]

        calls = fn.calls
        replay = capture(run_chunk, GRAPHS.memory_pool(device))
        per_replay, fn.calls = fn.calls - calls, calls
        while n < max_iter and n_active:
            for _ in range(replays):
                if n < max_iter:
                    replay()
                    fn.calls += per_replay
                    n += chunk
            n_active = int(last_counts[0][0])
        return n, n_active

    def loop_buffers() -> dict[str, Tensor]:
        """The tensors the loop updates in place (``_SolverGraphs.BUFFERS``)."""
        return {"gnorm0": gnorm0, "status": status, "best_res": best_res, "pending": pending, "nsteps": nsteps,
                "trace": trace, "done": done, "best_x": best_x, "best_fx": best_fx}  # fmt: skip

    def build_solver_graphs() -> _SolverGraphs:
        """graph="solver" (after the warm-up): f runs eagerly, and the rest of each iteration (residuals,
        accounting, the solver's update and next step) is one graph replay. One graph per position in a
        period of lcm(solver period, 2) iterations: f's output is copied into one of two buffers, in
        turn, so that the previous pair survives. Positions are captured on their first run."""
        static = _StaticBuffers(period_start())
        bind(static)
        start_state = state  # a period's first position starts from here (Anderson's ring slot included)
        fx_buffers = (torch.empty_like(static["next_x"]), static["prev_fx"])
        period = math.lcm(solver.period, 2)
        outputs: list[tuple[Tensor, ...]] = []
        pool = GRAPHS.memory_pool(device)  # the graphs replay in the order they were captured

        def body(j: int) -> None:  # no reference to the session: dropping it frees it, no cycle to collect
            nonlocal state
            if j == 0:  # from the static buffers (also where an earlier solve stopped mid-period)
                bind(static)
                state = start_state
            _, counts = absorb(_position_input(static, outputs, j), fx_buffers[j % 2], None, sync=False)
            x_next = advance(all_active=False, step_map=_map_not_captured)  # f is never captured
            if j == period - 1:  # the period's results into the buffers its first position reads
                static.copy_in({"next_x": x_next, **carried()})
                bind(static)
                x_next = static["next_x"]
            outputs[j : j + 1] = [(x_next, counts, prev_x, prev_fx)]

        capture_position = lambda j: capture(partial(body, j), pool)  # noqa: E731
        return _SolverGraphs(loop_buffers(), static, fx_buffers, period, capture_position, outputs)

    n = 0
    # Host syncs: with check_every == 1, one per iteration (how many samples are active); otherwise the
    # count is asked for every check_every iterations and read one iteration later (`check`), and the
    # loop masks unconditionally in between; graph=True checks after every `replays` chunks.
    n_active = int(counts[0])  # after the start
    session = key = None
    if graph == "solver":  # a kept session: the start into its buffers, then straight to its graphs
        key = (GRAPHS, solver, kernels, tuple(x.shape), x.dtype, device, tol, max_iter, stop, divergence,
               torch.is_inference_mode_enabled())  # fmt: skip
        try:
            session = _graph_cache.pop(key, None)  # while in use, a nested solve with the same key builds its own
        except TypeError:  # an unhashable solver (a mutable dataclass): nothing is kept
            key = None
        if session is not None:
            session.restart(loop_buffers(), period_start(), device)
            gnorm0, status, best_res, pending, nsteps, trace, done, best_x, best_fx = (
                session.buffers[name] for name in _SolverGraphs.BUFFERS
            )
    if graph and session is None:
        # warm up one period eagerly, off the main stream: compiles every kernel specialization the
        # capture will use and creates library handles (nothing may be compiled or loaded while capturing)
        with GRAPHS.warmup_stream(device):
            while n < min(solver.period, max_iter) and n_active:
                _, counts = iterate(None, sync=False, all_active=False)
                n_active = check(n, counts, n_active)  # as the eager loop: the same calls of f
                n += 1
        if graph is True and n_active and check_every > 1:  # the warm-up's count lags; the chunks check
            n_active = int(counts[0])  # only after replaying: know it now
        if n < max_iter and n_active:
            if graph is True:
                n, n_active = run_captured(n, n_active)
            else:
                session = build_solver_graphs()
    if session is not None and n < max_iter and n_active:
        n, n_active, prev_x, prev_fx = session.run(fn, n, n_active, max_iter, check)
    while n < max_iter and n_active:
        if check_every == 1:
            n_active, _ = iterate(n, sync=True, all_active=n_active == batch)
        else:
            _, counts = iterate(n, sync=False, all_active=False)
            n_active = check(n, counts, n_active)
        n += 1

    # samples still iterating at the end whose last pair was their best: take it (TAKE_NEW == 1)
    kernels.best_update(best_x, best_fx, prev_x, prev_fx, prev_x, prev_fx, pending.to(torch.int8))
    n = int(nsteps.max()) if (check_every > 1 or graph) else n  # drop the rows run after every sample stopped
    solution = Solution(
        x=best_x.view(x0.shape),
        fx=best_fx.view(x0.shape),
        residual=best_res,
        nsteps=nsteps,
        status=status,
        trace=trace[:n],
        nfev=fn.calls,
    )
    if session is None or key is None:
        return solution
    # the session's buffers serve the next solve: the result gets its own copies, and the session
    # keeps no reference to this solve's f
    solution = session.result(solution, device)
    fn.release()
    _keep_graphs(key, session)
    return solution

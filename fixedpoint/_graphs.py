"""graph="solver": f runs eagerly, and the rest of each iteration (residuals, per-sample accounting, the
solver's update and next step) is one CUDA graph replay, from graphs kept for later solves.

The loop (``_solve``) calls one function here, :func:`solve`, after its start; it builds on the loop's
``absorb``/``advance`` and its eager tail. What is here: capture and replay (swappable for stand-ins on
CPU), the static buffers carried between replays, the warm-up, the graphs of one solver period, and the
sessions kept for later solves. To capture f itself, compile it: ``step = torch.compile(f,
mode="reduce-overhead")`` (CUDA graph trees, re-recorded for new shapes) composes with any solver as
``lambda z: step(z).clone()`` (the trees overwrite an output at the next call).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields, replace
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .kernels.groups import LoopBuffers, Pair

__all__ = ["GRAPHS", "CudaGraphs", "SolverGraphs", "StaticBuffers", "clear_graph_cache", "solve"]


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
        """What the captures of one graph="solver" session share: a memory pool
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


GRAPHS = CudaGraphs()  # tests swap in a stand-in (fixedpoint.testing) to run the graph paths' logic on CPU
GRAPH_MODES = (False, "solver")


class StaticBuffers:
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
        """Write a replay's results into the buffers the next replay reads (each shared buffer once; a
        value that already is its buffer is not copied)."""
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


def position_input(static: StaticBuffers, outputs: list[tuple[Tensor, ...]], j: int) -> Tensor:
    """The iterate position j evaluates: the static one at a period's start, else the previous output."""
    return static["next_x"] if j == 0 else outputs[j - 1][0]


def map_not_captured(z: Tensor) -> Tensor:
    """The f a solver's step sees under graph="solver": f is never captured, so calling it is an error."""
    raise RuntimeError(
        "graph='solver' does not capture f, so the solver's step may not call it (Jacobian-vector products): "
        "use graph=False"
    )


@dataclass
class SolverGraphs:
    """graph="solver": one period's graphs and every buffer they read and write. f is not captured, so
    any later solve with the same key (solver, shapes, options) starts in these buffers and replays the
    same graphs: no warm-up, no capture."""

    buffers: LoopBuffers  # the loop's in-place tensors: a later solve's start goes here
    static: StaticBuffers  # the tensors carried from one replay to the next, and the next iterate to evaluate
    state: Any  # the solver's state over the static buffers where a replay starts (a later solve's ``reinit``)
    fx_buffers: tuple[Tensor, Tensor]  # f(x) of position j goes into fx_buffers[j % 2]
    period: int  # lcm(solver period, 2)
    capture: Callable[[int], Callable[[], None]]  # position -> its replay, capturing it (never refers to self)
    outputs: list[tuple[Tensor, Tensor, Pair]]  # per captured position: x_{j+1}, counts, (x_j, f(x_j))
    replays: list[Callable[[], None]] = field(default_factory=list)  # captured positions, in order
    finished: Any = None  # CUDA: an event behind the last solve's work, which the next one waits for

    def wait(self, device: torch.device) -> None:
        """Before a later solve writes its start into the buffers: after the last solve's work (which may
        have run on another stream)."""
        if self.finished is not None:
            torch.cuda.current_stream(device).wait_event(self.finished)

    def result(self, solution: Any, device: torch.device) -> Any:
        """``solution`` (a Solution), read from the kept buffers, copied out of them (the next solve
        overwrites them)."""
        copies = {f.name: getattr(solution, f.name).clone() for f in fields(solution) if f.name != "nfev"}
        if device.type == "cuda":  # the next solve waits for these copies
            self.finished = torch.cuda.Event()
            self.finished.record(torch.cuda.current_stream(device))
        return replace(solution, **copies)

    def begin(self, loop: Any) -> None:
        """A later solve, after its start: what is not in place already into the buffers (f is eager:
        its args need no copy)."""
        self.static.copy_in(_period_start(loop))

    def run(self, loop: Any, n: int, n_active: int) -> tuple[int, int]:
        """Iterate from position 0 until max_iter or no sample is active: f eagerly, then one replay.
        ``loop.check`` gives the active count the host knows after each iteration. Returns the iterations
        run and the active count; the last evaluated pair becomes the loop's."""
        j = 0
        while n < loop.max_iter and n_active:
            self.fx_buffers[j % 2].copy_(loop.fn(position_input(self.static, self.outputs, j)))
            if len(self.replays) == j:  # the first pass through a position captures it
                self.replays.append(self.capture(j))
            self.replays[j]()
            n_active = loop.check(n, self.outputs[j][1], n_active)
            n, j = n + 1, (j + 1) % self.period
        loop.prev = self.outputs[j - 1][2]
        return n, n_active


GRAPH_CACHE_SIZE = 4  # sessions kept (least recently used dropped)
_graph_cache: OrderedDict[tuple, SolverGraphs] = OrderedDict()


def clear_graph_cache() -> None:
    """Drop every graph session kept for later solves, and return the memory it held to the
    device (a dead graph's memory pool is freed only when the allocator's cache is emptied)."""
    _graph_cache.clear()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def session_key(graph: bool | str, x0: Tensor, options: tuple) -> tuple | None:
    """What a later solve must share with the solve that kept a session to replay its graphs, or None where
    nothing is kept (no graphs). ``x0``: the start as given; ``options``: the solver, the kernels and the
    loop's options. The graphs capture only the solver's own ops, which never run under autocast, so f
    and its inputs are not part of it.

    A key that cannot be hashed (a mutable dataclass solver) keeps nothing, with a warning: each solve then
    captures its own graphs."""
    if not graph:
        return None
    inference = torch.is_inference_mode_enabled()
    key = (GRAPHS, graph, tuple(x0.shape), x0.dtype, x0.device, inference, *options)
    try:
        hash(key)
    except TypeError as error:
        warnings.warn(f"graph={graph!r} keeps nothing for later solves: its key holds an unhashable value ({error})",
                      stacklevel=5)  # fmt: skip
        return None
    return key


def take_graphs(key: tuple | None, device: torch.device) -> SolverGraphs | None:
    """The kept session for ``key`` (from ``session_key``; None: nothing is kept), out of the cache while in
    use (a nested solve with the same key builds its own), once the last solve's work on it is done; or None."""
    session = None if key is None else _graph_cache.pop(key, None)
    if session is not None:
        session.wait(device)
    return session


def keep_graphs(key: tuple, session: SolverGraphs) -> None:
    """Keep ``session`` for later solves with ``key``, dropping the least recently used beyond the size."""
    _graph_cache[key] = session
    _graph_cache.move_to_end(key)
    while len(_graph_cache) > GRAPH_CACHE_SIZE:
        _graph_cache.popitem(last=False)


# ---------------------------------------------------------------- the mode, on a started loop (_solve._Loop)


def solve(loop: Any, session: SolverGraphs | None, key: tuple | None, n_active: int, shape: torch.Size) -> Any:
    """The rest of a started solve with graph="solver", to its Solution in ``shape``: a kept ``session``
    replays at once; otherwise the first solver period runs eagerly (the warm-up) and the graphs are
    captured as their positions first run. The loop's eager tail runs what is left (a sample still
    iterating past the graphs' end never happens: they run to max_iter). The session is kept under
    ``key`` (not when None), and the Solution gets copies of its buffers."""
    n = 0
    if session is not None:
        session.begin(loop)
    else:
        n, n_active = _warm_up(loop, n_active)
        if n < loop.max_iter and n_active:
            session = _build(loop)
    if session is not None and n < loop.max_iter and n_active:
        n, n_active = session.run(loop, n, n_active)
    solution = loop.finish(loop.run_eager(n, n_active), shape)
    if session is None or key is None:
        return solution
    solution = session.result(solution, loop.device)
    loop.fn.release()  # the graphs keep no reference to this solve's f
    keep_graphs(key, session)
    return solution


def _warm_up(loop: Any, n_active: int) -> tuple[int, int]:
    """The first solver period, eagerly, off the main stream: compiles every kernel specialization the
    capture will use and creates library handles (nothing may be compiled or loaded while capturing).
    Checks convergence as the eager loop does (the same calls of f). Returns the iterations run and the
    active count."""
    n = 0
    with GRAPHS.warmup_stream(loop.device):
        while n < min(loop.solver.period, loop.max_iter) and n_active:
            _, counts = loop.iterate(None, sync=False, all_active=False)
            n_active = loop.check(n, counts, n_active)
            n += 1
    return n, n_active


def _state_tensors(state: Any) -> dict[str, Tensor]:
    """The tensor fields of a solver state dataclass."""
    return {f.name: getattr(state, f.name) for f in fields(state) if isinstance(getattr(state, f.name), Tensor)}


def _carried(loop: Any) -> dict[str, Tensor]:
    """What one iteration hands the next, besides the tensors updated in place."""
    state_tensors = {f"state.{name}": value for name, value in _state_tensors(loop.state).items()}
    return {"active": loop.active, "prev_x": loop.prev.x, "prev_fx": loop.prev.fx, **state_tensors}


def _period_start(loop: Any) -> dict[str, Tensor]:
    """What a period's first position reads: the next iterate and the carried tensors."""
    return {"next_x": loop.advance(all_active=False), **_carried(loop)}


def _bind(loop: Any, static: StaticBuffers) -> None:
    """Point the loop's carried tensors at their static buffers."""
    loop.active, loop.prev = static["active"], Pair(static["prev_x"], static["prev_fx"])
    loop.state = replace(loop.state, **{name: static[f"state.{name}"] for name in _state_tensors(loop.state)})


def _store(loop: Any, static: StaticBuffers, **extra: Tensor) -> None:
    """Copy the carried tensors (and ``extra``) into their static buffers and point the loop at them."""
    static.copy_in({**extra, **_carried(loop)})
    _bind(loop, static)


def _capture(loop: Any, body: Callable[[], None], pool: Any) -> Callable[[], None]:
    try:
        return GRAPHS.capture(body, loop.device, pool)
    except RuntimeError as err:
        raise RuntimeError(f"graph='solver' could not capture the solver's part of the iteration in a CUDA graph: "
                           f"{err}") from err  # fmt: skip


def _build(loop: Any) -> SolverGraphs:
    """After the warm-up: f runs eagerly, and the rest of each iteration (residuals, accounting, the
    solver's update and next step) is one graph replay. One graph per position in a period of
    lcm(solver period, 2) iterations: f's output is copied into one of two buffers, in turn, so that the
    previous pair survives. Positions are captured on their first run."""
    static = StaticBuffers(_period_start(loop))
    _bind(loop, static)
    start_state = loop.state  # a period's first position starts from here (Anderson's ring slot included)
    fx_buffers = (torch.empty_like(static["next_x"]), static["prev_fx"])
    period = math.lcm(loop.solver.period, 2)
    outputs: list[tuple[Tensor, ...]] = []
    pool = GRAPHS.memory_pool(loop.device)  # the graphs replay in the order they were captured

    def body(j: int) -> None:  # no reference to the session: dropping it frees it, no cycle to collect
        if j == 0:  # from the static buffers (also where an earlier solve stopped mid-period)
            loop.state = start_state
            _bind(loop, static)
        _, counts = loop.absorb(position_input(static, outputs, j), fx_buffers[j % 2], None, sync=False)
        x_next = loop.advance(all_active=False, step_map=map_not_captured)  # f is never captured
        if j == period - 1:  # the period's results into the buffers its first position reads
            _store(loop, static, next_x=x_next)
            x_next = static["next_x"]
        outputs[j : j + 1] = [(x_next, counts, loop.prev)]

    capture_position = lambda j: _capture(loop, partial(body, j), pool)  # noqa: E731
    return SolverGraphs(loop.buffers, static, start_state, fx_buffers, period, capture_position, outputs)

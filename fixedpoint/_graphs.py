"""What the solver loop's CUDA-graph modes are built from: capture and replay (swappable for stand-ins on
CPU), the static buffers carried between replays, and the sessions kept for later solves: graph="solver"'s,
and graph=True's where f's changing inputs are declared.

The loop itself (which iterations are captured, how convergence is checked) is in ``_solve``.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

__all__ = ["GRAPHS", "ChunkGraphs", "CudaGraphs", "KeptSession", "SolverGraphs", "StaticBuffers", "clear_graph_cache"]


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


GRAPHS = CudaGraphs()  # tests swap in a stand-in (fixedpoint.testing) to run the graph paths' logic on CPU
GRAPH_CHUNK = 4  # iterations per captured chunk of graph=True, at least (see chunk_length)
GRAPH_MODES = (False, True, "solver")


def chunk_length(period: int, check_every: int, max_iter: int) -> int:
    """Iterations in one graph=True chunk, convergence being checked after each: check_every, at least
    GRAPH_CHUNK (copying a chunk's results back then costs little per iteration), rounded up to whole
    solver periods; where that passes max_iter, the whole periods within it (at least one). A solve of
    max_iter = check_every iterations (fixed budgets) is then one replay where the period divides it."""
    chunk = period * math.ceil(max(GRAPH_CHUNK, check_every) / period)
    return chunk if chunk <= max_iter else period * max(1, max_iter // period)


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
        "use graph=False or graph=True"
    )


class KeptSession:
    """What the two kinds of graph session share: the loop's in-place buffers and the solver state their
    graphs read, and the handover from one solve to the next. A subclass is a dataclass with these fields."""

    buffers: dict[str, Tensor]  # the loop's in-place tensors (``BUFFERS``): a later solve's start goes here
    static: StaticBuffers  # the tensors carried from one replay to the next
    state: Any  # the solver's state over the static buffers where a replay starts (a later solve's ``reinit``)
    finished: Any  # CUDA: an event behind the last solve's work, which the next one waits for

    BUFFERS: ClassVar[tuple[str, ...]] = (
        "gnorm0", "status", "best_res", "pending", "nsteps", "trace", "done", "best_x", "best_fx"
    )  # fmt: skip

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


@dataclass
class ChunkGraphs(KeptSession):
    """graph=True: one chunk of whole solver periods, f included, captured once and replayed. Kept for
    later solves when f's changing inputs are declared (``args``): a later solve with the same f, solver,
    options and shapes writes its start and its args into these buffers and replays: no warm-up, no capture."""

    buffers: dict[str, Tensor]
    static: StaticBuffers
    state: Any
    args: tuple  # f's further inputs as the graph reads them: their tensors are copies, written by each solve
    chunk: int  # iterations per replay
    calls: int  # calls of f per replay
    replay: Callable[[], None]
    counts: list[Tensor]  # [the chunk's last counts (2,)], in the graph's memory
    finished: Any = None
    replayed: bool = False  # the solve that captured replays once at least (see run)

    def begin(self, loop: Any, args: tuple) -> None:
        """A later solve, after its start: its args and what is not in place already into the buffers."""
        for static, value in zip(arg_tensors(self.args), arg_tensors(args), strict=True):
            static.copy_(value)
        loop.store(self.static)

    def run(self, loop: Any, n: int, n_active: int) -> tuple[int, int]:
        """Replay from iteration n while a whole chunk fits within max_iter and a sample is active,
        reading the active count after each replay; the loop runs what is left eagerly. Returns the
        iterations run and the active count.

        The solve that captured replays at least once, even past max_iter (the device stops every sample
        there). On CUDA it could go on eagerly instead, since a capture runs nothing; the stand-ins that
        test this on CPU run the captured body at capture, so that its first replay is the one skipped."""
        while n_active and (n + self.chunk <= loop.max_iter or not self.replayed):
            calls = loop.fn.calls
            self.replay()
            self.replayed = True
            loop.fn.calls = calls + self.calls  # (a stand-in's replay may call f itself)
            n += self.chunk
            n_active = int(self.counts[0][0])
        return n, n_active


@dataclass
class SolverGraphs(KeptSession):
    """graph="solver": one period's graphs and every buffer they read and write. f is not captured, so
    any later solve with the same key (solver, shapes, options) starts in these buffers and replays the
    same graphs: no warm-up, no capture."""

    buffers: dict[str, Tensor]
    static: StaticBuffers  # here also the next iterate a period's first position evaluates
    state: Any
    fx_buffers: tuple[Tensor, Tensor]  # f(x) of position j goes into fx_buffers[j % 2]
    period: int  # lcm(solver period, 2)
    capture: Callable[[int], Callable[[], None]]  # position -> its replay, capturing it (never refers to self)
    outputs: list[tuple[Tensor, ...]]  # per captured position: x_{j+1}, counts, x_j, f(x_j)
    replays: list[Callable[[], None]] = field(default_factory=list)  # captured positions, in order
    finished: Any = None

    def begin(self, loop: Any, args: tuple) -> None:
        """A later solve, after its start: what is not in place already into the buffers (f is eager:
        its args need no copy)."""
        self.static.copy_in(loop.period_start())

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
        loop.prev_x, loop.prev_fx = self.outputs[j - 1][2:]
        return n, n_active


GRAPH_CACHE_SIZE = 4  # sessions kept (least recently used dropped)
_graph_cache: OrderedDict[tuple, KeptSession] = OrderedDict()


def clear_graph_cache() -> None:
    """Drop every graph session kept for later solves, and return the memory it held to the
    device (a dead graph's memory pool is freed only when the allocator's cache is emptied)."""
    _graph_cache.clear()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def session_key(
    graph: bool | str, f: Callable, args: tuple | None, x0: Tensor, chunk: int | None,
    autocast: torch.dtype | None, options: tuple,
) -> tuple | None:  # fmt: skip
    """What a later solve must share with the solve that kept a session to replay its graphs, or None where
    nothing is kept. ``x0``: the start as given (its shape: f's view); ``chunk``: graph=True's chunk length;
    ``autocast``: the dtype f runs in under autocast, or None; ``options``: the solver, the kernels and the
    loop's options.

    graph=True captures f, so it keeps a session only where f's changing inputs are declared (``args``, even
    empty). Its key then also holds what the captured f depends on: f itself (which keeps it alive: its graph
    reads f's weights), the train/eval flags of f's modules (f a module or a module's method), autocast and
    the numerics settings, and the args' signature (``arg_signature``: the tensors' shapes and dtypes, in
    tuples, lists and dicts too, whose values are copied in; every other value by type and value, baked into
    the graph). graph="solver" captures only the solver's own ops, which never run under autocast.

    A key that cannot be hashed (args holding a set or an array, a mutable dataclass solver) keeps nothing,
    with a warning: each solve then captures its own graphs."""
    if graph is False or (graph is True and args is None):
        return None
    inference = torch.is_inference_mode_enabled()
    key = (GRAPHS, graph, tuple(x0.shape), x0.dtype, x0.device, inference, *options)
    if graph is True:
        key += (chunk, f, _module_modes(f), autocast, _numerics(), arg_signature(args))
    try:
        hash(key)
    except TypeError as error:
        warnings.warn(f"graph={graph!r} keeps nothing for later solves: its key holds an unhashable value ({error})",
                      stacklevel=5)  # fmt: skip
        return None
    return key


def _is_container(a: Any) -> bool:
    """Whether graph=True looks inside one of f's args: a tuple (named or not), a list or a dict. Anything
    else is one value, tensors inside it included (read by the graph where they are: changed in place only)."""
    return type(a) in (tuple, list, dict) or (isinstance(a, tuple) and hasattr(a, "_fields"))


def _items(a: tuple | list | dict) -> Iterable[tuple[Any, Any]]:
    return a.items() if isinstance(a, dict) else enumerate(a)


def arg_signature(a: Any) -> tuple:
    """What a kept graph=True session bakes in of f's args ``a``: a tensor's shape, dtype and device (its values
    are copied in), a container's type, keys and items' signatures, anything else its type and value (NaN as
    "nan", which matches itself)."""
    if isinstance(a, Tensor):
        return ("tensor", a.shape, a.dtype, a.device)
    if _is_container(a):
        return (type(a), tuple((k, arg_signature(v)) for k, v in _items(a)))
    if isinstance(a, float) and math.isnan(a):
        return (float, "nan")
    return (type(a), a)


def arg_tensors(a: Any) -> Iterator[Tensor]:
    """The tensors of f's args ``a`` that a kept graph reads copies of, in order (where arg_signature finds them)."""
    if isinstance(a, Tensor):
        yield a
    elif _is_container(a):
        for _, v in _items(a):
            yield from arg_tensors(v)


def _module_modes(f: Callable) -> tuple[bool, ...]:
    """The train/eval flags of f's modules, where f is a module or a module's method (dropout and batch norm
    are captured as they run at capture); () otherwise."""
    module = f if isinstance(f, torch.nn.Module) else getattr(f, "__self__", None)
    return tuple(m.training for m in module.modules()) if isinstance(module, torch.nn.Module) else ()


def _numerics() -> tuple:
    """Settings a captured f computes with besides autocast: float32 matmul precision (TF32) and reduced-
    precision reductions, deterministic algorithms, the attention backends."""
    cuda = torch.backends.cuda
    sdp = [cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled()]
    if hasattr(cuda, "cudnn_sdp_enabled"):  # torch >= 2.5
        sdp.append(cuda.cudnn_sdp_enabled())
    return (
        torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32,
        cuda.matmul.allow_fp16_reduced_precision_reduction, cuda.matmul.allow_bf16_reduced_precision_reduction,
        torch.are_deterministic_algorithms_enabled(), *sdp,
    )  # fmt: skip


@contextmanager
def uncached_autocast() -> Iterator[None]:
    """graph=True under autocast: its warm-up and capture with autocast's cache of cast weights off, so that
    the graph casts the weights itself (a cached copy would go stale when they change in place, and is freed
    when the autocast region that made it ends). f's autocast takes the setting when it is entered."""
    cached = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(cached)


def static_args(a: Any) -> Any:
    """f's further inputs ``a`` as a captured graph reads them: each tensor arg_tensors finds copied into a
    buffer of its own, in a container of the same type."""
    if isinstance(a, Tensor):
        return a.clone()
    if not _is_container(a):
        return a
    if isinstance(a, dict):
        return {k: static_args(v) for k, v in a.items()}
    values = [static_args(v) for v in a]
    return type(a)(*values) if type(a) not in (tuple, list) else type(a)(values)


def take_graphs(key: tuple | None) -> KeptSession | None:
    """The kept session for ``key`` (from ``session_key``; None: nothing is kept), out of the cache while in
    use (a nested solve with the same key builds its own), or None."""
    return None if key is None else _graph_cache.pop(key, None)


def keep_graphs(key: tuple, session: KeptSession) -> None:
    """Keep ``session`` for later solves with ``key``, dropping the least recently used beyond the size."""
    _graph_cache[key] = session
    _graph_cache.move_to_end(key)
    while len(_graph_cache) > GRAPH_CACHE_SIZE:
        _graph_cache.popitem(last=False)

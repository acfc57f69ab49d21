"""Problems with known fixed points, shared by the demo, the benchmarks and the tests; two stand-ins
for CUDA graphs that run graph="solver"'s logic on any device; and the kernels' groups built from the
tensors a kernel check cares about (the rest zeros)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .kernels.groups import AndersonState, BroydenState, LoopBuffers

__all__ = [
    "symmetric_matrix", "linear_deq", "EagerGraphs", "ReplayedGraphs", "anderson_state", "broyden_state",
    "loop_buffers",
]  # fmt: skip


def symmetric_matrix(dim: int, low: float, high: float, *, seed: int = 0, dtype=torch.float64) -> Tensor:
    """A symmetric (dim, dim) matrix with eigenvalues spread evenly over [low, high]."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return ((q * torch.linspace(low, high, dim, dtype=torch.float64)) @ q.T).to(dtype)


def linear_deq(
    dim: int = 256,
    batch: int = 4,
    *,
    low: float = -0.5,
    high: float = 0.98,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor]:
    """z = W z + b with W symmetric, eigenvalues evenly over [low, high].

    Returns ``(f, b, z_star)``: the batched map (B, dim) -> (B, dim), the
    injections b (B, dim) and the closed-form fixed point z* = (I - W)^-1 b.
    The defaults are the benchmark problem of docs/solvers.md.
    """
    w = symmetric_matrix(dim, low, high, seed=seed)
    b = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(dim, dtype=torch.float64) - w, b.T).T
    w, b = w.to(dtype), b.to(dtype)
    return (lambda z: z @ w.T + b), b, z_star.to(dtype)


class EagerGraphs:
    """graph="solver"'s logic, eagerly, on any device: swap it in for ``fixedpoint._graphs.GRAPHS``.

    Capture runs the body once for real (recording it, which on CUDA runs nothing); the replay after
    it is skipped (on CUDA that is the first run), later replays run the body again. Counts captures
    (one per position of a session's period) and memory pools (one per session); a capture must use one
    of them.
    """

    def __init__(self) -> None:
        self.captures = 0
        self.pools: list[object] = []

    def supports(self, x: Tensor) -> bool:
        return True

    def warmup_stream(self, device: torch.device) -> nullcontext:
        return nullcontext()

    def memory_pool(self, device: torch.device) -> object:
        self.pools.append(object())
        return self.pools[-1]

    def capture(self, body: Callable[[], None], device: torch.device, pool: Any) -> Callable[[], None]:
        if not any(pool is made for made in self.pools):
            raise ValueError("a capture must use a memory pool made by memory_pool()")
        self.captures += 1
        return _skip_first(self._record(body))

    def _record(self, body: Callable[[], None]) -> Callable[[], None]:
        """Run ``body`` once (the capture) and return what a later replay runs: the body again."""
        body()
        return body


def _skip_first(run: Callable[[], None]) -> Callable[[], None]:
    """A graph's replay: the first does nothing (on CUDA it is the first run, which the capture here already
    did), later ones call ``run``."""
    runs = [0]

    def replay() -> None:
        runs[0] += 1
        if runs[0] > 1:
            run()

    return replay


class _RecordedOps(TorchDispatchMode):
    """Records every aten op run under it (with its arguments and output); a host sync is an error."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple, dict, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise RuntimeError("a host sync (.item(), .tolist(), int(tensor)) while capturing a graph")
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, args, kwargs or {}, out))
        return out


def _same_view(a: Tensor, b: Tensor) -> bool:
    return (
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


class ReplayedGraphs(EagerGraphs):
    """Closer to CUDA graphs than EagerGraphs: Python runs only at capture. A replay reruns the aten ops the
    capture recorded, on the same tensors, and writes each op's result into the tensor it gave at capture
    (a graph reads and writes fixed memory). So Python-side state and branches are frozen at capture, as
    on CUDA, and a host sync while capturing is a RuntimeError. PyTorch kernels only: Triton launches are
    not aten ops (use EagerGraphs with them)."""

    def _record(self, body: Callable[[], None]) -> Callable[[], None]:
        recorded = _RecordedOps()
        with recorded:
            body()

        def rerun() -> None:
            for func, args, kwargs, out in recorded.ops:
                fresh = func(*args, **kwargs)
                for captured, new in zip(tree_leaves(out), tree_leaves(fresh)):
                    if isinstance(captured, Tensor) and captured is not new and not _same_view(captured, new):
                        captured.copy_(new)

        return rerun


# ----------------------------------------------------------------------------- kernel groups for checks


def anderson_state(
    F: Tensor, G: Tensor, slot: int = 0, alpha: Tensor | None = None, **buffers: Tensor
) -> AndersonState:
    """An AndersonState over the history F, G (B, m, D), a full ring (every slot written, so read), ``slot`` next,
    mixing weights ``alpha``; the absorb's buffers (gram, valid, newest, kept_gnorm, restarts, row) from
    ``buffers``, else zeros (kernels that read only F, G never see them)."""
    batch, m, _ = F.shape
    zeros = partial(torch.zeros, batch, device=F.device)
    unused = {"gram": zeros(m, m), "valid": zeros(m, dtype=torch.bool), "newest": zeros(m, dtype=torch.bool),
              "kept_gnorm": zeros(), "restarts": zeros(dtype=torch.long), "row": zeros(m)}  # fmt: skip
    return AndersonState(F=F, G=G, count=slot + m, alpha=alpha, **{**unused, **buffers})


def broyden_state(U: Tensor, V: Tensor, n: int, alive: Tensor | None = None, **kept: Tensor) -> BroydenState:
    """A BroydenState over U, V (B, m, D) with n slots in use; alive (every term by default), restarts and the
    kept iterate (x, g, gnorm, hg, next_x) from the arguments, else zeros."""
    batch, m, dim = U.shape
    if alive is None:
        alive = torch.ones(batch, m, dtype=torch.bool, device=U.device)
    missing = {"x", "g", "hg", "next_x"} - kept.keys()  # (B, D) zeros only where none is given: sizes may be large
    vector = torch.zeros(batch, dim, dtype=U.dtype, device=U.device) if missing else None
    defaults = {**dict.fromkeys(missing, vector), "gnorm": torch.zeros(batch, device=U.device),
                "restarts": torch.zeros(batch, dtype=torch.long, device=U.device)}  # fmt: skip
    return BroydenState(U=U, V=V, alive=alive, count=n, **{**defaults, **kept})


def loop_buffers(**buffers: Tensor) -> LoopBuffers:
    """The loop's buffers with those a kernel check reads (``best_update``: best_x, best_fx); the others None."""
    return LoopBuffers(**{**dict.fromkeys(LoopBuffers.__dataclass_fields__), **buffers})

"""The named groups the kernels take instead of long argument lists: the loop's buffers, its stop rule,
an evaluated pair, and the Anderson and Broyden states.

One way of updating throughout: a tensor field is a buffer a kernel may write in place (declared so
below); every other field (a count, a tensor a kernel returns anew) changes only by ``evolve``
(``dataclasses.replace`` without its per-call cost) into a new group. The groups are frozen, so a kept
reference (the graphs' start of a period) never sees a later iteration's counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import cache
from typing import NamedTuple, TypeVar

from torch import Tensor

__all__ = [
    "StopRule", "LoopBuffers", "Pair", "AndersonState", "BroydenState", "BroydenStep", "BroydenApplies", "evolve",
]  # fmt: skip

Group = TypeVar("Group")


@cache
def _field_names(cls: type) -> frozenset[str]:
    """The dataclass's field names (a TypeError for a class that is not a dataclass)."""
    return frozenset(f.name for f in fields(cls))


def evolve(group: Group, **changes: object) -> Group:
    """``dataclasses.replace(group, **changes)`` for the groups here and the solvers' own states (dataclasses
    with no ``__post_init__`` and no init-only fields): a copy of the instance's fields with ``changes``
    applied, not a new ``__init__`` call. ~1 us instead of
    replace's ~5 us: the solvers evolve their state two or three times per iteration, which on a tiny problem
    is a few percent of it. A name that is not a field is a TypeError, as replace gives."""
    unknown = changes.keys() - _field_names(type(group))
    if unknown:
        raise TypeError(f"{type(group).__name__} has no field(s) {sorted(unknown)}")
    new = object.__new__(type(group))
    new.__dict__.update(group.__dict__)  # frozen: the instance dict, not __setattr__
    new.__dict__.update(changes)
    return new


@dataclass(frozen=True)
class StopRule:
    """When a sample stops (``bookkeep``)."""

    tol: float  # converged when its residual is <= tol
    max_iter: int  # the last iteration (graph replays count on the device and stop there)
    relative: bool  # residual ||g|| / max(||f(x)||, REL_FLOOR * ||g(x0)||), else ||g||
    divergence: float = math.inf  # DIVERGED when ||g|| > divergence * ||g(x0)|| (inf: never)


@dataclass
class LoopBuffers:
    """The loop's per-sample tensors, written in place by ``bookkeep`` and ``best_update`` (every field a
    buffer; the eager loop replaces ``trace`` by a longer copy when it grows)."""

    gnorm0: Tensor  # (B,) the start's ||f(x) - x||, fp32/fp64
    status: Tensor  # (B,) int64 Status codes
    best_res: Tensor  # (B,) the lowest residual so far
    pending: Tensor  # (B,) bool: the best pair is the newest evaluated one, not copied yet
    nsteps: Tensor  # (B,) int64 iterations run
    trace: Tensor  # (rows, B) residual per iteration (NaN once stopped); the last row is scratch
    done: Tensor  # () int64 iterations run, counted on the device (graph replays)
    best_x: Tensor  # (B, D) the best iterate per sample
    best_fx: Tensor  # (B, D) f at it


class Pair(NamedTuple):
    """An iterate and its image, (B, D) each."""

    x: Tensor
    fx: Tensor


@dataclass(frozen=True)
class AndersonState:
    """Anderson's history: a ring of m pairs, slot ``count % m`` next.

    With a history narrower than the iterate (``history_dtype``) it is in difference form (``relative``):
    the ring holds the m - 1 differences of consecutive kept pairs, which shrink as the solve converges,
    and the newest kept pair stays in the iterate's dtype (x_kept, f_kept)."""

    # buffers, written in place
    F: Tensor  # (B, m, D) images f(x_i) of past iterates (x_i + beta g_i, per-sample beta); relative: f_{i+1} - f_i
    G: Tensor  # (B, m, D) their residuals g_i = f(x_i) - x_i; relative: g_{i+1} - g_i
    gram: Tensor  # (B, m, m) G G^T in fp32/fp64, one row and column per iteration
    valid: Tensor  # (B, m) bool: the slot holds a pair (relative: a difference) of the current history
    newest: Tensor  # (B, m) bool, one-hot: the slot of each sample's newest pair in its history (not relative)
    kept_gnorm: Tensor  # (B,) ||g|| of the newest pair kept (a blown-up pair is not)
    restarts: Tensor  # (B,) int64 history restarts per sample
    row: Tensor  # (B, m) the Gram row of the pair just written (copied into at a re-start); relative: (B, 2, m),
    # the new difference's Gram row and the projections G g of the new residual
    x_kept: Tensor | None = None  # relative: (B, D) the newest kept iterate, in x's dtype (written by the mixing)
    f_kept: Tensor | None = None  # relative: (B, D) f at it
    took: Tensor | None = None  # relative: (B,) bool, the last evaluated pair is kept (not blown up)
    # replaced
    count: int = 0  # pairs (relative: differences) written so far
    alpha: Tensor | None = None  # (B, m) the next step's mixing weights (relative: -gamma, the differences' weights)
    beta: Tensor | None = None  # (B,) per-sample beta (beta="auto"; a buffer, written in place), else None
    x_new: Tensor | None = None  # relative: (B, D) the last evaluated iterate (the mixing keeps it where ``took``)
    f_new: Tensor | None = None  # relative: (B, D) f at it

    @property
    def slot(self) -> int:
        """The ring slot the next pair goes to."""
        return self.count % self.F.shape[1]

    @property
    def relative(self) -> bool:
        """The difference form: a low-precision history (differences) beside the newest kept pair."""
        return self.x_kept is not None


@dataclass(frozen=True)
class BroydenState:
    """Limited-memory good Broyden: H = -I + sum_i alive_i u_i v_i^T approximates the inverse Jacobian of
    g(x) = f(x) - x over the first ``count`` slots, and the iterate it was last updated at."""

    # buffers, written in place
    U: Tensor  # (B, m, D)
    V: Tensor  # (B, m, D)
    alive: Tensor  # (B, m) bool: the term belongs to this sample's current H
    restarts: Tensor  # (B,) int64
    # replaced
    x: Tensor  # (B, D) the iterate kept
    g: Tensor  # (B, D) f(x) - x (times ``scale``)
    gnorm: Tensor  # (B,) its norm
    hg: Tensor  # (B, D) H g: the step is x <- x - H g
    next_x: Tensor  # (B, D) x - H g: the next iterate to evaluate
    count: int = 0  # slots in use
    scale: Tensor | None = None  # (B,) H0 = -scale I, as Broyden on scale (f(x) - x) with H0 = -I; None: 1


class BroydenStep(NamedTuple):
    """The pair just evaluated, as Broyden's update reads it."""

    x: Tensor  # (B, D)
    g: Tensor  # (B, D) f(x) - x
    gnorm: Tensor  # (B,)
    dx: Tensor  # (B, D) x minus the state's x


class BroydenApplies(NamedTuple):
    """``broyden_combine``'s results: the two applies of H and the dot products of the update."""

    h_g: Tensor  # (B, D) H g (the H before the update)
    v: Tensor  # (B, D) H^T dx
    sums: Tensor  # (B, 4) fp32/fp64: dx . (h_g - hg), ||dx||^2, ||h_g - hg||^2, v . g; a narrower history (B, 6):
    # also ||v||^2 and ||dx - (h_g - hg)||^2

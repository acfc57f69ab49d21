"""fixedpoint: batched fixed-point solvers z = f(z) for PyTorch, and gradients through them."""

from ._backward import (
    ConvergenceWarning,
    GradInfo,
    implicit,
    jacobian_penalty,
    jfb,
    phantom,
    stochastic_jfb,
    unrolled,
)
from ._common import Status
from ._diagnostics import spectral_radius
from ._module import FixedPoint
from ._newton import newton
from ._solve import Solution, Solver, clear_graph_cache, solve
from ._solvers import anderson, broyden, picard

__all__ = [
    "ConvergenceWarning",
    "FixedPoint",
    "GradInfo",
    "Solution",
    "Solver",
    "Status",
    "anderson",
    "broyden",
    "clear_graph_cache",
    "implicit",
    "jacobian_penalty",
    "jfb",
    "newton",
    "phantom",
    "picard",
    "solve",
    "spectral_radius",
    "stochastic_jfb",
    "unrolled",
]
__version__ = "0.2.0"

"""fixedpoint: batched fixed-point solvers z = f(z) for PyTorch, and gradients through them."""

from ._newton import newton
from ._solve import Solution, Status
from ._solvers import anderson, broyden, picard

__all__ = ["Solution", "Status", "anderson", "broyden", "newton", "picard"]
__version__ = "0.1.0"

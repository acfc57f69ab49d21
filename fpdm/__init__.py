"""fpdm: Fixed Point Diffusion Models (Bai & Melas-Kyriazi, CVPR 2024) on the fixedpoint library.

``load_model(path)`` reads any weights file the field publishes (this project's checkpoints and exports, the
official DiT checkpoints, the FPDM release's) without running code; ``create_model(name)`` builds a fresh one.
"""

from .checkpoint import CheckpointError
from .checks import InputError
from .models import FPDM, DiT, ModelConfig, create_model
from .weights import export_weights, load_model, read_weights

__all__ = [
    "CheckpointError", "DiT", "FPDM", "InputError", "ModelConfig", "create_model", "export_weights", "load_model",
    "read_weights",
]  # fmt: skip

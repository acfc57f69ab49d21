import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU (read when they are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # the shared problem set: `from problems import ...`
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _no_kept_graphs():
    """Each test starts and ends without graph="solver" sessions kept by another."""
    from fixedpoint import clear_graph_cache

    clear_graph_cache()
    yield
    clear_graph_cache()

import os
import sys

import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU (read when they are defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # the shared problem set: `from problems import ...`
torch.set_num_threads(min(2, torch.get_num_threads()))

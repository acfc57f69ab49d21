import os
import subprocess
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


@pytest.fixture
def cli(capfd):
    """A command run in-process through its entry point, ``cli("fpdm.sample", argv) -> (exit code, stdout,
    stderr)``: the code path of ``python -m fpdm.sample`` (its ``cli(argv)``, argparse's exits included), without
    an interpreter start per call. For checks of what a command refuses and says; runs that need a process of
    their own (killed, distributed, environment variables) use subprocess."""
    import importlib

    def run(module: str, argv) -> tuple[int, str, str]:
        entry = importlib.import_module(module).cli
        try:
            code = entry([str(a) for a in argv])
        except SystemExit as stop:  # argparse: a bad flag, --help
            code = stop.code
        captured = capfd.readouterr()  # file descriptors: a command's own subprocesses (study's runs) too
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    """``trained_checkpoint(model="FPDM-T/2", *extra) -> Path``: the checkpoint of one tiny training run on
    digits (3 steps of 16 images, no sample grid, plus ``extra`` flags), made once per session for each
    (model, extra) and shared by the command tests, which only read it (a test that changes one copies it)."""
    made: dict[tuple, object] = {}

    def get(model: str = "FPDM-T/2", *extra: str):
        key = (model, *extra)
        if key not in made:
            out = tmp_path_factory.mktemp(model.replace("/", "-"))
            cmd = [sys.executable, "-m", "fpdm.train", "--model", model, "--steps", "3", "--batch-size", "16",
                   "--sample-steps", "0", "--quiet", "--out", str(out), *extra]  # fmt: skip
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr
            made[key] = out / "checkpoints" / "latest.pt"
        return made[key]

    return get


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory):
    """One feature-network cache for the session (``--cache-dir``, ``FPDM_CACHE``): the digits classifier is
    trained once, by whichever test needs it first."""
    return tmp_path_factory.mktemp("feature-cache")

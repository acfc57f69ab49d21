"""python -m fpdm.train end to end: outputs, resume (exact), checkpoints, many processes, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from processes import launch

FAST = ["--model", "DiT-T/2", "--batch-size", "16", "--sample-steps", "2", "--quiet", "--log-every", "1"]


def run(*args, env=None, timeout=240):
    environment = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fpdm.train", *args], capture_output=True, text=True,
                          timeout=timeout, env=environment)  # fmt: skip


def _one_line_error(result, match):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert match in lines[0], lines[0]


def _weights(out: Path) -> dict:
    ckpt = torch.load(out / "checkpoints" / "latest.pt", weights_only=False)
    return {"step": ckpt["step"], **{f"model.{k}": v for k, v in ckpt["model"].items()},
            **{f"ema.{k}": v for k, v in ckpt["ema"].items()}}  # fmt: skip


def _assert_same_weights(a: dict, b: dict):
    assert a["step"] == b["step"]
    for key in a:
        if key != "step":
            assert torch.equal(a[key], b[key]), key


def test_a_short_run_writes_everything(tmp_path):
    result = run("--steps", "4", "--out", str(tmp_path), "--model", "FPDM-T/2", "--batch-size", "16",
                 "--sample-steps", "2", "--quiet", "--log-every", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name in ("samples.png", "loss.png", "metrics.jsonl", "config.json", "checkpoints/latest.pt"):
        assert (tmp_path / name).is_file(), name
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(0 <= r["no_grad_iters"] <= 10 and 1 <= r["grad_iters"] <= 12 for r in records)
    assert all(r["loss"] > 0 for r in records)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["kind"] == "fpdm" and config["model"]["input_size"] == 8


def test_resume_equals_an_uninterrupted_run(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run("--steps", "6", "--out", str(whole), *FAST, "--model", "FPDM-T/2").returncode == 0
    assert run("--steps", "3", "--out", str(parts), *FAST, "--model", "FPDM-T/2").returncode == 0
    second = run("--steps", "6", "--out", str(parts), *FAST, "--model", "FPDM-T/2")
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stdout and "at step 3" in second.stdout
    _assert_same_weights(_weights(whole), _weights(parts))
    steps = [json.loads(line)["step"] for line in (parts / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    metrics = (parts / "metrics.jsonl").read_text()
    again = run("--steps", "6", "--out", str(parts), *FAST, "--model", "FPDM-T/2")  # a finished run: nothing to do
    assert again.returncode == 0 and "already trained to step 6 (--steps 6): nothing to train" in again.stdout
    _assert_same_weights(_weights(whole), _weights(parts))
    assert (parts / "metrics.jsonl").read_text() == metrics and (parts / "samples.png").is_file()


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_killed_run_resumed_equals_an_uninterrupted_run(tmp_path):
    """The weights bit for bit, and the loss records too (a record spanning the kill averages the same steps)."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    args = ["--steps", "30", "--ckpt-every", "5", *FAST, "--log-every", "3"]
    assert run(*args, "--out", str(whole)).returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "fpdm.train", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)  # fmt: skip
    ckpt = killed / "checkpoints" / "latest.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=False)["step"]
    assert killed_at < 30, "the run finished before it could be killed"
    resumed = run(*args, "--out", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {killed_at}" in resumed.stdout
    _assert_same_weights(_weights(whole), _weights(killed))
    assert _losses(killed) == _losses(whole)


def test_two_processes_with_gloo(tmp_path):
    """Two ranks under torchrun. Output goes to files (a hung rank holding a pipe cannot block the test), and on
    a timeout torchrun's group and its workers (each in a session of its own) are killed: a rank left behind
    by a killed run kept running and could stall later runs."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fpdm.train", "--steps", "3", "--out", str(out), *FAST, "--sample-steps", "0"]  # fmt: skip
    result = launch(cmd, tmp_path, "run", str(out))
    stdout, stderr = result.stdout, result.stderr
    assert result.returncode == 0, f"exit {result.returncode} (-9: killed after 300 s): {stderr[-3000:]}"
    assert "2 process(es)" in stdout and "8 images each" in stdout
    ckpt = torch.load(out / "checkpoints" / "latest.pt", weights_only=False)
    assert ckpt["step"] == 3 and len(ckpt["rng"]) == 2 and ckpt["run"]["world_size"] == 2


def test_corrupt_checkpoint_is_an_error_and_is_not_overwritten(capsys, tmp_path):
    from fpdm import train

    path = tmp_path / "checkpoints" / "latest.pt"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    _cli_error(capsys, train, ["--steps", "2", "--out", str(tmp_path), *FAST], "is unreadable")
    assert path.read_bytes() == b"not a checkpoint"


def test_mismatched_checkpoint_is_an_error_and_is_not_overwritten(capsys, tmp_path):
    from fpdm import train

    assert run("--steps", "2", "--out", str(tmp_path), *FAST).returncode == 0
    before = (tmp_path / "checkpoints" / "latest.pt").read_bytes()
    out = ["--steps", "4", "--out", str(tmp_path)]
    _cli_error(capsys, train, [*out, *FAST, "--lr", "0.01"], "lr=0.001 (now 0.01)")
    _cli_error(capsys, train, [*out, *FAST[2:], "--model", "FPDM-T/2"], "model=DiT-T/2")
    assert (tmp_path / "checkpoints" / "latest.pt").read_bytes() == before


@pytest.mark.parametrize(
    "args,match",
    [
        (["--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["--model", "DiT-Huge/2"], "unknown --model 'DiT-Huge/2'"),
        (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "apt-get install dataset-fashion-mnist"),
        (["--dataset", "folder:/nonexistent"], "image folder /nonexistent does not exist"),
        (["--dataset", "latents:/nonexistent"], "no latent shards"),
        (["--lr", "-1"], "--lr must be a positive finite number, got -1.0"),
        (["--lr", "inf"], "--lr must be a positive finite number, got inf"),
        (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1.0"),
        (["--model", "DiT-T/2", "--pre-depth", "3", "--grad-iters", "2,4"],
         "--pre-depth, --grad-iters apply to FPDM models, not DiT-T/2"),
        (["--image-size", "16"], "--image-size resizes folder:PATH images; digits has its own size"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_nonzero(capsys, tmp_path, args, match):
    """In-process through ``cli(argv)``, the code path of ``python -m fpdm.train``."""
    from fpdm import train

    _cli_error(capsys, train, ["--steps", "1", "--out", str(tmp_path), "--quiet", *args], match)
    assert not (tmp_path / "checkpoints").exists()


def test_a_batch_not_divisible_by_the_world_size_is_one_line(tmp_path):
    """Under torchrun's environment (a process of its own: the check comes before any process group)."""
    result = run("--steps", "1", "--out", str(tmp_path), "--quiet", "--batch-size", "3",
                 env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, timeout=60)  # fmt: skip
    _one_line_error(result, "not divisible by the 2")


def test_an_output_path_below_a_file_is_one_line(capsys, tmp_path):
    from fpdm import train

    (tmp_path / "afile").write_text("keep me")
    for out in ("afile", "afile/sub"):
        _cli_error(capsys, train, ["--steps", "1", "--out", str(tmp_path / out), "--quiet"], "is a file")
    assert (tmp_path / "afile").read_text() == "keep me"


def test_a_diverging_run_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """A NaN loss stops training at that step: no checkpoint is written after it (NaN weights never are), and the
    message names the step the checkpoint on disk holds."""
    result = run("--steps", "40", "--lr", "1e12", "--warmup", "0", "--ckpt-every", "1", "--out", str(tmp_path), *FAST,
                 timeout=120)  # fmt: skip
    _one_line_error(result, "training diverged")
    failed_at = int(result.stderr.split(" at step ")[1].split(":")[0])
    ckpt = torch.load(tmp_path / "checkpoints" / "latest.pt", weights_only=False)
    assert ckpt["step"] == failed_at - 1 and f"holds step {failed_at - 1}" in result.stderr
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_bad_flag_values_exit_nonzero_without_traceback(capsys, tmp_path):
    from fpdm import train

    _cli_error(capsys, train, ["--steps", "zero", "--out", str(tmp_path)], "--steps")


def test_checkpoint_write_is_atomic(tmp_path):
    from fpdm.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"step": 1})
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 (any failure while writing)
        save_checkpoint(path, {"step": 2, "bad": lambda: None})  # not picklable: fails mid-write
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]  # no temporary file left behind


def test_a_save_removes_temporaries_that_killed_saves_left_behind(tmp_path):
    from fpdm.checkpoint import save_checkpoint

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".latest.pt.tmp-{int(dead.stdout)}"  # a process that no longer exists
    stale.write_bytes(b"half a checkpoint")
    mine = tmp_path / f".latest.pt.tmp-{os.getppid()}"  # a live process (the test runner's parent)
    mine.write_bytes(b"a save in progress")
    save_checkpoint(tmp_path / "latest.pt", {"step": 1})
    assert not stale.exists() and mine.exists()


def _cli_error(capsys, module, argv, match, code=2):
    """One line on stderr naming the problem, exit ``code``, no traceback: parse errors included."""
    try:
        returned = module.cli(argv)
    except SystemExit as exit_:  # argparse
        returned = exit_.code
    err = capsys.readouterr().err
    assert returned == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and match in lines[0], err


@pytest.mark.parametrize("module_name", ["train", "sample", "evaluate", "encode", "study"])
def test_every_command_reports_a_bad_flag_in_one_line(capsys, module_name):
    import importlib

    module = importlib.import_module(f"fpdm.{module_name}")
    _cli_error(capsys, module, ["--no-such-flag"], f"python -m fpdm.{module_name}: error: ")  # (or a missing one)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--steps", "-1"], "argument --steps: expected a positive integer, got '-1'"),
        (["--seed", "-1"], "argument --seed: expected an integer in [0, 2^32), got '-1'"),
        (["--seed", str(2**64)], "expected an integer in [0, 2^32)"),
        (["--num-timesteps", "5"], "--num-timesteps must be at least 21"),
    ],
)
def test_bad_train_values_are_one_line(capsys, tmp_path, argv, match):
    from fpdm import train

    _cli_error(capsys, train, ["--out", str(tmp_path), "--quiet", *argv], match)


def test_a_second_run_on_the_same_out_is_refused(capsys, tmp_path):
    """Two runs on one folder would interleave their checkpoints and metrics: the second stops at once."""
    from fpdm import checks, train

    with checks.run_lock(tmp_path):
        _cli_error(capsys, train, ["--steps", "1", "--out", str(tmp_path), *FAST],
                   f"--out {tmp_path} is in use by another run (process {os.getpid()})")  # fmt: skip
    assert not (tmp_path / "checkpoints").exists()
    with checks.run_lock(tmp_path):  # released with the run that held it
        pass


def test_a_damaged_checkpoint_is_one_line_and_the_same_model_resumes(capsys, tmp_path):
    """A checkpoint that loads but lacks a part (or holds a bad step) is refused in one line and left as it was;
    --depth equal to the named size's depth is the same model, so it resumes."""
    from fpdm import train

    assert run("--steps", "2", "--out", str(tmp_path), *FAST).returncode == 0
    path = tmp_path / "checkpoints" / "latest.pt"
    good = path.read_bytes()
    for damage, match in ((lambda c: c.pop("rng"), "incomplete or damaged (KeyError: 'rng')"),
                          (lambda c: c.update(step="abc"), "its step is 'abc'")):  # fmt: skip
        path.write_bytes(good)
        ckpt = torch.load(path, weights_only=False)
        damage(ckpt)
        torch.save(ckpt, path)
        damaged = path.read_bytes()
        _cli_error(capsys, train, ["--steps", "3", "--out", str(tmp_path), *FAST], match)
        assert path.read_bytes() == damaged
    path.write_bytes(good)
    resumed = run("--steps", "3", "--out", str(tmp_path), *FAST, "--depth", "4")  # DiT-T's depth
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    """A full disk (torch.save's RuntimeError) or an OSError: one line naming the file; the last good checkpoint
    and no temporary file remain."""
    from fpdm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"step": 1})

    def full_disk(obj, fh):
        fh.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64\nmore")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*unexpected pos 64\); .* still holds the"):
        save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path)["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["latest.pt"]


def test_an_unwritable_out_and_file_errors_are_one_line(capsys, tmp_path, monkeypatch):
    """--out that cannot be written is refused before any work; a file error later (OSError) is one line, exit 1;
    Ctrl-C says whether there is a checkpoint to resume from."""
    import argparse
    import errno
    import tempfile

    from fpdm import checks, train

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "TemporaryFile", read_only)
        with pytest.raises(checks.InputError, match=f"--out {tmp_path} is not writable: Read-only file system"):
            checks.output_dir(tmp_path)

    def fails(error):
        def run(args):
            raise error

        return run

    parser = checks.Parser(prog="p")
    disk = OSError(errno.ENOSPC, "No space left on device", "out/samples.npz")
    assert checks.run_cli(parser, [], fails(disk), ()) == 1
    assert capsys.readouterr().err == "error: [Errno 28] No space left on device: 'out/samples.npz'\n"
    assert checks.run_cli(parser, [], fails(KeyboardInterrupt()), (), interrupted=lambda a: "stopped") == 130
    assert capsys.readouterr().err == "stopped\n"
    args = argparse.Namespace(out=str(tmp_path), dataset="digits", model="DiT-T/2")
    assert "starts over" in train._interrupted(args)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.pt").write_bytes(b"")
    assert f"resume from {tmp_path / 'checkpoints' / 'latest.pt'}" in train._interrupted(args)


def test_training_draws_its_sjfb_iterations_from_the_runs_generator(tmp_path):
    """Catches: train.py not giving the model its saved S-JFB generator (the draws would come from the global
    RNG, which label dropout also draws from: a resumed run would not be the same run). Values: each step's
    recorded counts are the generator's draws, seeded as train.py seeds it (rank 0, third generator)."""
    result = run("--steps", "5", "--out", str(tmp_path), "--model", "FPDM-T/2", "--batch-size", "8", "--seed", "3",
                 "--sample-steps", "0", "--quiet", "--log-every", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    g = torch.Generator().manual_seed(3 * 7919 + 2)
    expected = [(int(torch.randint(0, 11, (), generator=g)), int(torch.randint(1, 13, (), generator=g)))
                for _ in range(5)]  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["no_grad_iters"], r["grad_iters"]) for r in records] == expected


@pytest.mark.parametrize(
    "module_name,argv,match",
    [
        ("train", ["--grad-iters", "1,2,3"], "argument --grad-iters: expected LOW,HIGH (two integers), got '1,2,3'"),
        ("train", ["--no-grad-iters", "a,1"], "argument --no-grad-iters: expected LOW,HIGH (two integers), got 'a,1'"),
        ("train", ["--depth", "x"], "argument --depth: expected a positive integer, got 'x'"),
        ("evaluate", ["--dit-steps", "5,0"], "argument --dit-steps: expected positive integers, got '5,0'"),
        ("study", ["--dit-steps", "0"], "argument --dit-steps: expected positive integers, got '0'"),
        ("study", ["--dit-steps", "2,a"], "argument --dit-steps: expected comma-separated integers, got '2,a'"),
        ("sample", ["--ckpt", "c", "--out", "o", "--classes", "1,b"],
         "argument --classes: expected 'random' or comma-separated integers, got '1,b'"),
        ("encode", ["--dataset", "d", "--vae", "v", "--out", "o", "--seed", "-2"],
         "argument --seed: expected an integer in [0, 2^32), got '-2'"),
    ],
)  # fmt: skip
def test_every_commands_argument_types_name_the_flag_and_the_value(capsys, module_name, argv, match):
    """The argparse types shared by the commands (fpdm.checks): a bad value is one line naming the flag and
    the value, exit 2, before any work."""
    import importlib

    _cli_error(capsys, importlib.import_module(f"fpdm.{module_name}"), argv, match)


def test_the_commands_errors_are_one_input_error():
    """Catches: an error class of its own again in one command (its failures would print a traceback unless
    every command listed it), or an old name gone (``except SampleError`` in users' code)."""
    import fpdm
    from fpdm import checkpoint, checks, data, encode, evaluate, sample, train

    olds = (checkpoint.CheckpointError, data.DataError, encode.EncodeError, evaluate.EvaluateError,
            sample.SampleError, train.UsageError, fpdm.CheckpointError)  # fmt: skip
    assert all(cls is checks.InputError is fpdm.InputError for cls in olds)
    assert issubclass(checks.InputError, ValueError)
    with pytest.raises(sample.SampleError, match="image folder /no/such/dataset does not exist"):
        data.load_dataset("folder:/no/such/dataset")
    for error in olds:

        def fails(args, error=error):
            raise error("--flag value: why")

        assert checks.run_cli(checks.Parser(prog="p"), [], fails) == 2


def test_grids_during_training_leave_the_run_as_it_was(tmp_path):
    """--sample-every K writes an EMA grid every K steps and redraws loss.png, and the run's weights are bit for
    bit those of a run without it: the grids draw from their own generator. Catches: a grid drawing from the
    training generators or the global RNG (label dropout), a grid left in train mode, a missing folder."""
    from fpdm import train

    base = ["--model", "DiT-T/2", "--steps", "4", "--batch-size", "8", "--sample-steps", "2", "--quiet"]
    assert train.cli([*base, "--out", str(tmp_path / "plain")]) == 0
    assert train.cli([*base, "--out", str(tmp_path / "watched"), "--sample-every", "2"]) == 0
    _assert_same_weights(_weights(tmp_path / "plain"), _weights(tmp_path / "watched"))
    grids = sorted(p.name for p in (tmp_path / "watched" / "grids").iterdir())
    assert grids == ["step-0000002.png", "step-0000004.png"] and not (tmp_path / "plain" / "grids").exists()


def test_sample_every_without_a_grid_is_one_line(capsys, tmp_path):
    from fpdm import train

    _cli_error(capsys, train, ["--out", str(tmp_path), "--sample-every", "5", "--sample-steps", "0"],
               "--sample-every needs --sample-steps > 0")  # fmt: skip
    _cli_error(capsys, train, ["--out", str(tmp_path), "--sample-every", "-1"], "--sample-every must be >= 0, got -1")


def test_a_compiled_run_trains_the_same_model(tmp_path, monkeypatch):
    """--compile passes the forward through torch.compile (here its aot_eager backend: inductor's C++ builds
    take a minute on a CPU) and trains the eager run's model to float tolerance, an FPDM included (its
    fixed-point solve is a graph break); checkpoints hold the model's own keys, not the compiled wrapper's.
    Catches: the compiled wrapper's state_dict ("_orig_mod." keys) saved, the S-JFB generator lost through
    the wrapper, the EMA updated from a copy."""
    from fpdm import train

    compiled = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(kw) or real(model, backend="aot_eager"))
    base = ["--model", "FPDM-T/2", "--steps", "2", "--batch-size", "8", "--sample-steps", "0", "--quiet"]
    assert train.cli([*base, "--out", str(tmp_path / "eager")]) == 0
    assert compiled == []
    assert train.cli([*base, "--out", str(tmp_path / "compiled"), "--compile", "on"]) == 0
    assert compiled == [{"mode": None}]
    eager, fast = _weights(tmp_path / "eager"), _weights(tmp_path / "compiled")
    assert eager.keys() == fast.keys()
    for key in eager:
        if key != "step":
            torch.testing.assert_close(fast[key], eager[key], rtol=1e-4, atol=1e-6, msg=key)
    records = [json.loads(line) for line in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()]
    eager_records = [json.loads(line) for line in (tmp_path / "eager" / "metrics.jsonl").read_text().splitlines()]
    assert [r["grad_iters"] for r in records] == [r["grad_iters"] for r in eager_records]  # the same S-JFB draws


def test_tf32_off_cuda_is_one_line(capsys, tmp_path):
    from fpdm import train

    if torch.cuda.is_available():
        pytest.skip("CUDA present: --tf32 applies")
    _cli_error(capsys, train, ["--out", str(tmp_path), "--tf32", "--device", "cpu"], "--tf32 applies to CUDA")


def _spy_batches(monkeypatch) -> list[tuple]:
    """Every training step's (x, y, t) as the loss sees them, and torch's global RNG state (label dropout's), recorded
    in this process."""
    from fpdm.diffusion import Diffusion

    seen, real = [], Diffusion.training_losses

    def spy(self, net, x, t, y, noise, *args, **kwargs):
        seen.append((x.detach().clone(), y.clone(), t.clone(), torch.get_rng_state()))
        return real(self, net, x, t, y, noise, *args, **kwargs)

    monkeypatch.setattr(Diffusion, "training_losses", spy)
    return seen


def test_the_default_runs_batches_are_those_it_drew_before_streaming(tmp_path, monkeypatch):
    """The default run's first batches, pinned against values computed with the code that held the data set on
    the device (before the DataLoader, 0.2.0): catches a loader that draws other indices, reorders, converts or
    rounds the pixels, or draws from torch's global RNG (a DataLoader takes its seed from it unless given a
    generator: label dropout would change), which would make a run checkpointed before resume to other weights."""
    import hashlib

    from fpdm import train

    seen = _spy_batches(monkeypatch)
    assert train.cli(["--steps", "3", "--out", str(tmp_path), "--sample-steps", "0", "--quiet"]) == 0
    g = torch.Generator().manual_seed(0)
    indices = [torch.randint(1437, (128,), generator=g) for _ in range(3)]
    pinned = [  # first 8 indices, their sum, sha256 of the pixels (first 16 hex), pixel sum, |pixel| sum, label sum
        ([515, 636, 977, 1011, 58, 1011, 337, 529], 95943, "5d27c3c405a67487", -3188.0, 6492.75, 637),
        ([1132, 1045, 871, 1075, 1174, 727, 644, 208], 86883, "9ed520e73f1477fe", -3212.375, 6444.375, 559),
        ([22, 1260, 596, 524, 60, 1395, 424, 897], 90391, "09b84ede75b37fc8", -3163.625, 6481.125, 616),
    ]
    global_rng = ["1ccf17250133dec5", "9f518ac42a01429a", "e86fa11858b5ff4a"]  # sha256 of its state, first 16 hex
    for (x, y, _, rng), idx, (first, total, digest, pixels, magnitude, labels), state in zip(
        seen, indices, pinned, global_rng, strict=True
    ):
        assert hashlib.sha256(rng.numpy().tobytes()).hexdigest()[:16] == state
        assert idx[:8].tolist() == first and int(idx.sum()) == total
        assert hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()[:16] == digest
        assert x.double().sum().item() == pixels and x.double().abs().sum().item() == magnitude
        assert int(y.sum()) == labels and x.dtype == torch.float32 and x.shape == (128, 1, 8, 8)


def test_flip_mirrors_the_images_its_generator_draws_and_must_match_on_resume(tmp_path, monkeypatch, capsys):
    """--flip: catches flips that are not horizontal, not the checkpointed generator's draws (a resumed run would
    differ), a resume that silently drops or adds flips, and flips of latents (the encoder's job)."""
    import numpy as np

    from fpdm import train
    from fpdm.data import load_dataset, step_flips

    seen = _spy_batches(monkeypatch)
    args = ["--steps", "2", "--out", str(tmp_path / "run"), *FAST, "--flip", "--ckpt-every", "1"]
    assert train.cli(args) == 0
    images = load_dataset("digits").images
    data_g, flip_g = torch.Generator().manual_seed(0), torch.Generator().manual_seed(3)
    for x, *_ in seen:
        idx = torch.randint(len(images), (16,), generator=data_g)
        flips = step_flips(flip_g, 16)
        assert 0 < int(flips.sum()) < 16
        assert torch.equal(x, torch.where(flips[:, None, None, None], images[idx].flip(-1), images[idx]))
    capsys.readouterr()
    assert train.cli([a for a in args if a != "--flip"]) == 2
    assert "was made with flip=True (now False)" in capsys.readouterr().err
    latents = tmp_path / "z"
    latents.mkdir()
    np.savez(latents / "a.npz", latents=np.zeros((4, 4, 2, 2), np.float16), labels=np.zeros(4, int), num_classes=2)
    assert train.cli(["--dataset", f"latents:{latents}", "--out", str(tmp_path / "l"), *FAST, "--flip"]) == 2
    assert "encode flipped copies with `python -m fpdm.encode --flip`" in capsys.readouterr().err


def _board_scalars(out: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_events_are_the_metrics_records_and_a_resume_shows_each_step_once(tmp_path, monkeypatch):
    """--tensorboard logs what metrics.jsonl records (train/loss, train/lr, ... at their steps) and the grids;
    a run that died after logging steps its checkpoint does not hold resumes without showing them twice.
    Catches: events at other steps or with other values than the records, a missing flush (the dead run's
    events lost), a resumed run whose steps show twice (purge_step, and TensorBoard's reader, drop the dead
    run's events from step 3 on), no grid image."""
    pytest.importorskip("tensorboard")
    import fpdm.train as train
    from fpdm.train import read_metrics

    out = tmp_path / "run"
    args = ["--model", "DiT-T/2", "--steps", "4", "--batch-size", "8", "--log-every", "1", "--ckpt-every", "2",
            "--sample-steps", "2", "--sample-every", "2", "--quiet", "--tensorboard", "--out", str(out)]  # fmt: skip
    real_save, saves = train.save_checkpoint, []

    def dies_at_the_second_save(path, state):
        saves.append(state["step"])
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed while writing step 4's checkpoint: steps 3, 4 already logged
        real_save(path, state)

    monkeypatch.setattr(train, "save_checkpoint", dies_at_the_second_save)
    assert train.cli(args) != 0  # "interrupted: run the same command again to resume"
    assert [s for s, _ in _board_scalars(out, "train/loss")] == [1, 2, 3, 4]
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    assert train.cli(args) == 0
    records = read_metrics(out / "metrics.jsonl")
    for name in ("loss", "lr", "steps_per_s"):
        logged = _board_scalars(out, f"train/{name}")
        assert [s for s, _ in logged] == [1, 2, 3, 4]  # each step once: the dead run's 3 and 4 purged
        assert [v for _, v in logged] == pytest.approx([r[name] for r in records], rel=1e-6)  # float32 events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples/ema")][-1] == 4

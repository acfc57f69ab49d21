"""Nothing lost, nothing silently wrong: the commands' outputs, damaged inputs and impossible sizes.

Each test reproduces a defect an independent probe found (issue 24) and names it."""

import errno
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fpdm import checks, evaluate, sample, train
from fpdm.checkpoint import CheckpointError, save_checkpoint
from fpdm.files import WriteError, atomic_write

TINY = ["--batch-size", "8", "--sample-steps", "0", "--quiet", "--log-every", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A one-step DiT-T/2 on digits (cheap): a checkpoint to sample and damage."""
    out = tmp_path_factory.mktemp("run")
    assert train.cli(["--model", "DiT-T/2", "--out", str(out), "--steps", "2", *TINY]) == 0
    return out / "checkpoints" / "latest.pt"


def _one_line(capsys, code, returned, match):
    err = capsys.readouterr().err.strip().splitlines()
    assert returned == code and len(err) == 1 and match in err[0], (returned, err)


def _sample(ckpt, out, *extra):
    return sample.cli(["--ckpt", str(ckpt), "--out", str(out), "--num-samples", "4", "--steps", "2", "--quiet",
                       *extra])  # fmt: skip


# ----------------------------------------------------------------------------- writes


def test_a_full_disk_during_sampling_keeps_the_previous_complete_set(trained, tmp_path, capsys, monkeypatch):
    """Bug: samples.npz written in place: a full disk left a 4 KB unreadable npz beside an old stats.json. The
    finished batches (shards) stay for the rerun, which writes the set."""
    out = tmp_path / "s"
    assert _sample(trained, out) == 0
    before = {name: (out / name).read_bytes() for name in ("samples.npz", "samples.png", "stats.json")}

    def full_disk(fh, **arrays):
        fh.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sample, "_write_npz", full_disk)
    _one_line(capsys, 1, _sample(trained, out, "--seed", "3"), "no space left on the device")
    assert {name: (out / name).read_bytes() for name in before} == before  # the whole earlier set, untouched
    assert sorted(p.name for p in out.iterdir()) == [".lock", "samples.npz", "samples.png", "shards", "stats.json"]
    monkeypatch.undo()
    assert _sample(trained, out, "--seed", "3") == 0
    assert sorted(p.name for p in out.iterdir()) == [".lock", "samples.npz", "samples.png", "stats.json"]


def test_a_sampler_writes_its_set_manifest_last_and_takes_the_folders_lock(trained, tmp_path, capsys):
    """Bugs: two samplers on one --out both succeed and mix their files; stats.json not describing the npz."""
    out = tmp_path / "s"
    assert _sample(trained, out) == 0
    stats = json.loads((out / "stats.json").read_text())
    with np.load(out / "samples.npz") as data:
        assert stats["num_samples"] == len(data["arr_0"]) == 4 and data["arr_0"].dtype == np.uint8
    assert stats["files"] == ["samples.npz", "samples.png"]
    capsys.readouterr()
    with checks.run_lock(out):  # another sampler holds the folder
        _one_line(capsys, 2, _sample(trained, out), "is in use by another run")


def test_a_resumed_run_rewrites_its_metrics_atomically(tmp_path, monkeypatch, capsys):
    """Bug: the resume truncated metrics.jsonl in place: a kill then lost every record."""
    out = tmp_path / "run"
    argv = ["--model", "DiT-T/2", "--out", str(out), *TINY]
    assert train.cli([*argv, "--steps", "3"]) == 0
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + '{"step": 99, "loss": 1.0}\n[1, 2]\n')
    before = (out / "metrics.jsonl").read_text()
    import fpdm.files

    def killed(fd):
        raise OSError(errno.EIO, "killed mid-write")

    monkeypatch.setattr(fpdm.files.os, "fsync", killed)
    assert train.cli([*argv, "--steps", "4"]) != 0
    assert (out / "metrics.jsonl").read_text() == before  # not truncated
    monkeypatch.undo()
    capsys.readouterr()
    assert train.cli([*argv, "--steps", "4"]) == 0  # and the damaged line [1, 2] is no traceback
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"step": 1})
    before = path.read_bytes()

    def full(obj, fh):
        fh.write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0: No space left")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*\(no space left on the device\); .*"
                                              r"still holds the previous checkpoint"):  # fmt: skip
        save_checkpoint(path, {"step": 2})
    assert path.read_bytes() == before


def test_atomic_write_names_the_file_and_leaves_no_temporary(tmp_path):
    def fails(fh):
        fh.write(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=r"cannot write .*out\.json \(no space left on the device\); nothing was"):
        atomic_write(tmp_path / "out.json", fails)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- silently wrong results


def test_non_finite_weights_are_refused_naming_the_checkpoint(trained, tmp_path, capsys):
    """Bug: NaN weights sampled all-black images and exited 0."""
    ckpt = torch.load(trained, weights_only=True)
    ckpt["ema"]["blocks.1.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    _one_line(capsys, 2, _sample(tmp_path / "nan.pt", tmp_path / "s"), "weights hold NaN or Inf "
              "(blocks.1.attn.qkv.weight)")  # fmt: skip
    assert not (tmp_path / "s").exists()


def test_a_diverging_sampler_is_an_error_not_black_images(monkeypatch):
    from fpdm.models import create_model
    from fpdm.sample import SampleError, generate, plan_compute

    model = create_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10).eval()
    monkeypatch.setattr(model.final_layer.linear.bias, "data", torch.full_like(model.final_layer.linear.bias, 1e38))
    with pytest.raises(SampleError, match=r"non-finite values \(NaN/Inf\) in the batch of samples 0..3"):
        generate(model, torch.arange(4), plan_compute(model.config, steps=3), image_shape=(1, 8, 8),
                 clip=False, progress=False)  # fmt: skip


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "arrays,match",
    [
        (dict(images=np.zeros((4, 8, 8, 1), np.float32), labels=np.arange(4)), "its images are float32"),
        (dict(images=np.zeros((4, 8, 8, 1), np.uint16), labels=np.arange(4)), "its images are uint16"),
        (dict(images=np.zeros((4, 8, 8, 1), bool), labels=np.arange(4)), "its images are bool"),
        (dict(images=np.zeros((4, 8, 8, 1), np.complex64), labels=np.arange(4)), "its images are complex64"),
        (dict(images=np.zeros((4, 8, 8, 1), np.uint8), labels=np.arange(4.0)), "its labels are float64"),
        (dict(images=np.zeros((4, 8, 8, 1), np.uint8), labels=np.array([0, 1, 2, 99])), "labels 0..99"),
        (dict(images=np.zeros((4, 8, 8, 1), np.uint8), labels=np.array([-1, 1, 2, 3])), "labels -1..3"),
        (dict(pictures=np.zeros((4, 8, 8, 1), np.uint8)), "no arr_0 or images; no labels or arr_1 in it (it holds pic"),
    ],
)
def test_evaluate_samples_accepts_uint8_nhwc_and_integer_labels_only(tmp_path, capsys, arrays, match):
    """Bugs: float images in [-1, 1] read as 0-255 (Frechet 131 instead of 52), out-of-range labels scored 0."""
    path = _npz(tmp_path / "s.npz", **arrays)
    code = evaluate.cli(["--samples", str(path), "--dataset", "digits", "--cache-dir", str(tmp_path / "c")])
    _one_line(capsys, 2, code, match)
    assert not list(tmp_path.glob("c/featurenet-*"))  # refused before any feature network trains


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"\x93NUMPY"])
def test_evaluate_samples_on_a_truncated_file_is_one_line(tmp_path, capsys, content):
    (tmp_path / "s.npz").write_bytes(content)
    _one_line(capsys, 2, evaluate.cli(["--samples", str(tmp_path / "s.npz"), "--dataset", "digits"]),
              "cannot read samples")  # fmt: skip


def test_frechet_distance_of_non_finite_features_is_an_error():
    a = np.random.default_rng(0).normal(size=(20, 3))
    b = a.copy()
    b[3, 1] = np.nan
    with pytest.raises(evaluate.EvaluateError, match="second set's features hold NaN or Inf"):
        evaluate.frechet_distance(a, b)


def test_non_finite_training_data_is_named_as_such(tmp_path, capsys):
    """Bug: NaN in latents reported as "training diverged (lower --lr)"."""
    latents = np.random.default_rng(0).normal(size=(6, 4, 8, 8)).astype(np.float16)
    latents[4, 0, 0, 0] = np.nan
    (tmp_path / "lat").mkdir()
    np.savez(tmp_path / "lat" / "latents-00000.npz", latents=latents, labels=np.arange(6) % 2, num_classes=2)
    code = train.cli(["--dataset", f"latents:{tmp_path / 'lat'}", "--model", "DiT-T/2", "--out", str(tmp_path / "r"),
                      "--steps", "1", *TINY])  # fmt: skip
    _one_line(capsys, 2, code, "holds non-finite values (NaN or Inf) in 1 of 6 images (the first: index 4)")


# ----------------------------------------------------------------------------- impossible sizes and damaged fields


def test_planning_is_linear_and_impossible_plans_are_refused_at_once(trained, tmp_path, capsys):
    """Bug: ``sample --steps 1000000`` ran over 10 minutes in an O(n^2) plan before refusing."""
    from fpdm.models import create_model
    from fpdm.sample import plan_compute

    cfg = create_model("FPDM-T/2", input_size=8, in_channels=1, num_classes=10).config
    start = time.perf_counter()
    plan = plan_compute(cfg, steps=200_000, budget=2_000_000, schedule="high-noise")
    assert time.perf_counter() - start < 5 and sum(plan.calls) == 2_000_000 - 200_000 * 2
    start = time.perf_counter()
    code = sample.cli(["--ckpt", str(trained), "--out", str(tmp_path / "s"), "--steps", "1000000", "--quiet"])
    _one_line(capsys, 2, code, "1000000 sampling steps > the 1000 diffusion timesteps")
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--num-samples", str(10**13)], "--num-samples 10000000000000 needs about"),
        (["--batch-size", str(10**12), "--num-samples", str(10**6)], "--batch-size 1000000000000 needs about"),
    ],
)
def test_sizes_that_cannot_fit_name_the_option_and_the_memory(trained, tmp_path, capsys, argv, match):
    _one_line(capsys, 2, sample.cli(["--ckpt", str(trained), "--out", str(tmp_path / "s"), "--steps", "2",
                                     "--quiet", *argv]), match)  # fmt: skip
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--model", "FPDM-T/2", "--pre-depth", str(10**7)], "--pre-depth/--post-depth"),
        (["--model", "DiT-T/2", "--batch-size", str(2**40)], "--batch-size 1099511627776 needs about"),
        (["--model", "DiT-T/2", "--num-timesteps", str(10**12)], "--num-timesteps 1000000000000 needs about"),
    ],
)
def test_training_sizes_that_cannot_fit_are_one_line(tmp_path, capsys, argv, match):
    code = train.cli([*argv, "--out", str(tmp_path / "r"), "--steps", "1", "--quiet", "--sample-steps", "0"])
    _one_line(capsys, 2, code, match)


def test_guidance_channels_zero_is_refused_not_read_as_all(trained, tmp_path, capsys):
    """Bug: ``--guidance-channels 0`` taken as unset (all channels) instead of an error."""
    _one_line(capsys, 2, _sample(trained, tmp_path / "s", "--guidance-channels", "0"),
              "--guidance-channels must be in 1..1, got 0")  # fmt: skip


def test_a_bad_dataset_creates_no_run_folder(tmp_path, capsys, monkeypatch):
    """Bug: ``--dataset nope`` left runs/nope-FPDM-T-2/.lock behind."""
    monkeypatch.chdir(tmp_path)
    _one_line(capsys, 2, train.cli(["--dataset", "nope", "--steps", "1", "--quiet"]), "unknown dataset 'nope'")
    _one_line(capsys, 2, train.cli(["--dataset", "folder:/nonexistent", "--steps", "1", "--quiet"]),
              "image folder /nonexistent does not exist")  # fmt: skip
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda c: c["run"].update(num_timesteps="abc"), "run.num_timesteps='abc' is damaged"),
        (lambda c: c.update(sampling={"guidance": "x"}), "sampling.guidance='x' is damaged"),
    ],
)
def test_damaged_fields_of_a_checkpoint_are_one_line(trained, tmp_path, capsys, damage, match):
    ckpt = torch.load(trained, weights_only=True)
    damage(ckpt)
    torch.save(ckpt, tmp_path / "bad.pt")
    _one_line(capsys, 2, _sample(tmp_path / "bad.pt", tmp_path / "s"), match)


def test_a_damaged_log_window_is_one_line_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", "DiT-T/2", "--out", str(out), *TINY]
    assert train.cli([*argv, "--steps", "1"]) == 0
    ckpt = torch.load(out / "checkpoints" / "latest.pt", weights_only=True)
    ckpt["log_window"] = "abc"
    torch.save(ckpt, out / "checkpoints" / "latest.pt")
    capsys.readouterr()
    _one_line(capsys, 2, train.cli([*argv, "--steps", "2"]), "its log_window is 'abc'")


def test_a_sweep_that_fails_keeps_the_rows_it_finished(trained, tmp_path, monkeypatch, capsys):
    """Bug: a failure at the last setting of a long sweep lost every row computed before."""
    real, calls = evaluate.generate, []

    def fails_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise evaluate.SampleError("sampling gave non-finite values (NaN/Inf)")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "generate", fails_second)
    code = evaluate.cli(["--ckpt", str(trained), "--dit-steps", "1,2", "--num-samples", "10", "--out",
                         str(tmp_path / "e"), "--cache-dir", str(tmp_path / "c"), "--quiet"])  # fmt: skip
    assert code == 2 and "non-finite" in capsys.readouterr().err
    rows = json.loads((tmp_path / "e" / "results.json").read_text())
    assert [r["dit_steps"] for r in rows] == [1]


def test_the_loss_plots_smoothed_curve_follows_the_raw_one(tmp_path):
    """The smoothed loss is a centred average of log-loss: an exponentially falling loss is followed exactly at
    every record (an exponential average trailed it by ~20 records: hundreds of steps on the default run's
    loss.png), and noise around a trend is reduced. Catches: a causal (lagging) filter, a window that is not
    centred at the ends, averaging in linear space on the log-scale plot."""
    from fpdm.images import plot_loss_curve, smooth_curve, smoothing_half_width

    steps = np.arange(400)
    falling = 2.0 * np.exp(-steps / 60)
    np.testing.assert_allclose(smooth_curve(list(falling), 10), falling, rtol=1e-12)
    noisy = falling * np.exp(np.random.default_rng(0).normal(0, 0.2, size=400))
    smoothed = smooth_curve(list(noisy), smoothing_half_width(400))
    assert smoothing_half_width(400) == 10
    np.testing.assert_allclose(smoothed[[0, -1]], noisy[[0, -1]], rtol=1e-12)  # the ends: the raw points
    error = lambda curve: np.abs(np.log(curve / falling)).mean()  # noqa: E731
    assert error(smoothed) < 0.4 * error(noisy)
    np.testing.assert_allclose(smooth_curve([1.0, -1.0, 3.0], 1), [1.0, 1.0, 3.0])  # not all positive: linear
    records = [{"step": int(s), "loss": float(v)} for s, v in zip(steps, noisy)]
    assert plot_loss_curve(records, tmp_path / "loss.png").stat().st_size > 0

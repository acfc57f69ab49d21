"""Sampling at scale: torchrun processes sample the 1-process run's images, shards resume, settings are checked."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from processes import launch

from fpdm import checks, sample

SMALL = ["--num-samples", "6", "--steps", "3", "--batch-size", "2", "--quiet", "--device", "cpu"]


@pytest.fixture
def ckpt(trained_checkpoint):
    return trained_checkpoint("FPDM-T/2")


def _read(out: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    with np.load(out / "samples.npz") as data:
        images, labels = data["arr_0"], data["labels"]
    stats = json.loads((out / "stats.json").read_text())
    stats.pop("seconds")  # the only field that differs from run to run
    return images, labels, stats


def _launch(cmd: list[str], tmp_path: Path, name: str, marker: str) -> subprocess.CompletedProcess:
    """``cmd`` with its output in files, killed with its ranks on a timeout (``processes.launch``)."""
    return launch(cmd, tmp_path, name, marker)


def test_two_ranks_with_gloo_sample_the_one_process_images_bit_for_bit(tmp_path, ckpt):
    """Catches: ranks drawing from one seed (the same noise in every rank's batches, or images depending on the
    batches a rank sampled before), a rank's share lost or written twice, stats averaged per rank instead of
    over the run, rank 0 assembling before the others finished."""
    runs = {}
    for name, launcher in [("one", [sys.executable]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node", "2"])]:  # fmt: skip
        out = tmp_path / name
        cmd = [*launcher, "-m", "fpdm.sample", "--ckpt", str(ckpt), "--out", str(out), *SMALL, "--reuse"]
        result = _launch(cmd, tmp_path, name, str(out))
        assert result.returncode == 0, f"exit {result.returncode} (-9: killed after 300 s): {result.stderr[-3000:]}"
        assert sorted(p.name for p in out.iterdir()) == [".lock", "samples.npz", "samples.png", "stats.json"]
        runs[name] = _read(out)
    (one_images, one_labels, one_stats), (two_images, two_labels, two_stats) = runs["one"], runs["two"]
    assert one_images.shape == (6, 8, 8, 1) and len(np.unique(one_images.reshape(6, -1), axis=0)) == 6
    assert np.array_equal(one_images, two_images) and np.array_equal(one_labels, two_labels)
    assert one_stats == two_stats


def _args(ckpt, out, *extra):
    return sample.build_parser().parse_args(["--ckpt", str(ckpt), "--out", str(out), *SMALL, *extra])


def test_any_split_of_the_batches_over_ranks_samples_the_same_images(tmp_path, ckpt):
    """Catches: a batch's noise depending on the batches sampled before it in the same process (one generator for
    all), so that 2, 3 or 4 processes (one of them idle) give other images than one; stats that depend on the
    split. In-process: each rank's function run in turn, without torch.distributed."""
    job = sample.prepare(_args(ckpt, tmp_path), torch.device("cpu"))
    results = {}
    for world in (1, 2, 3, 4):
        job.out = checks.output_dir(tmp_path / f"world-{world}")
        for rank in reversed(range(world)):  # the order the ranks finish in does not matter either
            sample.sample_shards(job, list(job.batches), rank, world)
        summary = sample.assemble(job)
        summary.pop("seconds")
        results[world] = (*_read(job.out)[:2], summary)
    for world in (2, 3, 4):
        assert np.array_equal(results[world][0], results[1][0]) and results[world][2] == results[1][2]
    batches = dict((i, x) for i, x, _ in sample.sample_batches(job.model, job.labels, job.plan, indices=[2, 0],
                                                                progress=False, **job.options))  # fmt: skip
    images, _ = sample.generate(job.model, job.labels, job.plan, progress=False, **job.options)
    assert torch.equal(batches[0], images[:2]) and torch.equal(batches[2], images[4:])


def test_an_interrupted_run_resumes_without_sampling_its_finished_batches_again(tmp_path, ckpt, monkeypatch, capsys):
    """Catches: a resume that samples everything again (hours lost at 50k samples), one that loses or repeats a
    batch, or one whose images differ from an uninterrupted run's."""
    real, sampled = sample.sample_batches, []

    def interrupted_after_one(*args, **kwargs):
        for n, item in enumerate(real(*args, **kwargs)):
            if n == 1:
                raise KeyboardInterrupt  # Ctrl-C while the second batch is sampled
            yield item

    def counting(*args, **kwargs):
        for item in real(*args, **kwargs):
            sampled.append(item[0])
            yield item

    out = tmp_path / "s"
    monkeypatch.setattr(sample, "sample_batches", interrupted_after_one)
    assert sample.cli(["--ckpt", str(ckpt), "--out", str(out), *SMALL]) == 130
    assert f"the finished batches are kept in {out / 'shards'}" in capsys.readouterr().err
    assert [p.name for p in (out / "shards").iterdir()] == ["samples-000000000-000000001.npz"]
    assert not (out / "samples.npz").exists()
    monkeypatch.setattr(sample, "sample_batches", counting)
    assert sample.cli(["--ckpt", str(ckpt), "--out", str(out), *SMALL]) == 0
    assert sampled == [1, 2] and not (out / "shards").exists()
    assert sample.cli(["--ckpt", str(ckpt), "--out", str(tmp_path / "whole"), *SMALL]) == 0
    resumed, whole = _read(out), _read(tmp_path / "whole")
    assert np.array_equal(resumed[0], whole[0]) and resumed[2] == whole[2]


@pytest.mark.parametrize("change,match", [
    (["--seed", "1"], "(seed: 0 there, 1 now)"),
    (["--steps", "4"], "(steps: 3 there, 4 now)"),
    (["--weights", "model"], "(weights: 'ema' there, 'model' now)"),
])  # fmt: skip
def test_shards_of_other_settings_are_refused_in_one_line(tmp_path, ckpt, monkeypatch, capsys, change, match):
    """Catches: a rerun with another seed, plan or weights mixing the earlier run's batches into its set (a
    samples.npz of two settings, silently), or a traceback instead of the reason."""
    out = tmp_path / "s"

    def interrupted(*args, **kwargs):
        yield next(iter(real(*args, **kwargs)))
        raise KeyboardInterrupt

    real = sample.sample_batches
    monkeypatch.setattr(sample, "sample_batches", interrupted)
    assert sample.cli(["--ckpt", str(ckpt), "--out", str(out), *SMALL]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    code = sample.cli(["--ckpt", str(ckpt), "--out", str(out), *SMALL, *change])  # the last --steps counts
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and f"{out / 'shards'} holds batches sampled with other settings {match}" in line, line
    assert f"remove {out / 'shards'}" in line and len(list((out / "shards").iterdir())) == 1  # kept

"""Inception statistics interchangeable with ADM's evaluator and pytorch-fid: the npz layouts, --ref-stats,
--save-stats, uint8 quantisation, the Inception Score. With a randomly initialised FID Inception of the real
architecture (no weights are downloaded)."""

import json

import numpy as np
import pytest
import torch

from fpdm import evaluate
from fpdm.evaluate import (
    FeatureStats,
    feature_stats,
    frechet_from_moments,
    inception_features,
    inception_score,
    quantize,
    read_images,
    read_inception_stats,
    read_samples,
)  # fmt: skip
from fpdm.inception import load_fid_inception
from fpdm.testing import save_random_fid_inception


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """pytorch-fid's file layout with random weights (``fpdm.testing.save_random_fid_inception``: features vary
    with the image at O(1), a nonzero fc bias)."""
    return save_random_fid_inception(tmp_path_factory.mktemp("inception") / "pt_inception.pth")


@pytest.fixture(scope="module")
def net(weights):
    return load_fid_inception(weights)


def _pixels(seed: int, n: int = 6, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, channels), dtype=np.uint8)


def _run(cli, *args) -> dict:
    code, out, err = cli("fpdm.evaluate", [*args, "--quiet"])
    assert code == 0, err
    return json.loads(out)


def _one_line_error(cli, args, match: str) -> str:
    code, _, err = cli("fpdm.evaluate", args)
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and match in err, err
    return err


def test_saved_statistics_give_exactly_the_fid_of_the_images_themselves(tmp_path, cli, weights):
    """Bugs: statistics saved in float32 or normalised by N instead of N - 1, or a reference from images taking
    another numerical path than one from statistics: the same comparison would give two FIDs."""
    np.savez(tmp_path / "gen.npz", arr_0=_pixels(1), labels=np.arange(6))
    np.savez(tmp_path / "ref.npz", arr_0=_pixels(2))
    inception = ["--inception", weights]
    against_images = _run(cli, "--samples", tmp_path / "gen.npz", *inception, "--ref-stats", tmp_path / "ref.npz")
    _run(cli, "--save-stats", tmp_path / "stats.npz", *inception, "--samples", tmp_path / "ref.npz")
    against_stats = _run(cli, "--samples", tmp_path / "gen.npz", *inception, "--ref-stats", tmp_path / "stats.npz")
    assert against_stats["inception_fid"] == against_images["inception_fid"] > 0  # bit for bit
    assert against_stats["inception_score"] == against_images["inception_score"] > 1 - 1e-9
    with np.load(tmp_path / "stats.npz") as saved:  # what pytorch-fid reads: f["mu"][:], f["sigma"][:]
        assert sorted(saved.files) == ["input", "mu", "mu_s", "sigma", "sigma_s"]  # + sFID's, as ADM's files
        mu, sigma = saved["mu"][:], saved["sigma"][:]
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert not list(tmp_path.glob(".stats.npz.tmp-*"))  # written atomically, nothing left behind


def test_samples_in_adm_layout_and_our_old_layout_read_alike(tmp_path):
    """Bugs: ADM's sample batches (arr_0, labels in arr_1) or our samples from before 0.2 (images) refused, or
    the uint8 <-> [-1, 1] conversion off by a level (x / 255 * 2 - 1 is not exact for every level)."""
    pixels, labels = _pixels(3, n=5, channels=1), np.array([3, 1, 4, 1, 5])
    layouts = {"adm": dict(arr_0=pixels, labels=labels), "adm_arr_1": dict(arr_0=pixels, arr_1=labels),
               "old": dict(images=pixels, labels=labels)}  # fmt: skip
    for name, arrays in layouts.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        images, read_labels = read_samples(tmp_path / f"{name}.npz")
        assert images.shape == (5, 1, 8, 8) and read_labels.tolist() == labels.tolist()
        assert np.array_equal(evaluate.to_uint8(images), pixels)  # the round trip is exact
        assert np.array_equal(read_images(tmp_path / f"{name}.npz"), pixels)
    assert torch.equal(quantize(images), images)  # samples are already on the uint8 grid


def test_images_within_a_quantisation_level_give_the_same_inception_features(net):
    """Bug: float images fed to Inception as they are, while the reference came from PNG/uint8 files: a set
    and its saved copy differ, so a model's FID depends on whether its samples were saved first."""
    images = quantize(torch.rand(4, 3, 8, 8) * 2 - 1)
    nudged = images + (torch.rand_like(images) - 0.5) * (0.9 / 127.5)  # below half a level (1/255 in [0, 1])
    assert not torch.equal(nudged, images)
    features = inception_features(net, images)
    assert np.array_equal(inception_features(net, nudged), features)  # bit for bit
    assert np.array_equal(inception_features(net, evaluate.to_uint8(images)), features)  # uint8 input alike
    stats = feature_stats(features)
    fid = frechet_from_moments(*feature_stats(inception_features(net, nudged)), *stats)
    assert fid == frechet_from_moments(*stats, *stats)  # exactly the FID of the set with itself, which is 0 up
    assert abs(fid) < 1e-5 * np.trace(stats.sigma)  # to the square roots of 2045 rounding-level eigenvalues


def test_inception_score_uses_the_unbiased_logits_and_adms_splits(net):
    """Bugs: the fc bias added to the logits (ADM and torch-fidelity leave it out), the KL taken the other way
    round, the marginal over the wrong axis, splits averaged as KLs instead of as scores."""
    features = torch.randn(3, 2048, dtype=torch.float64)
    expected = features @ net.fc.weight.double().T
    assert torch.allclose(net.logits(features), expected) and net.fc.bias.abs().max() > 0.1
    confident = torch.nn.functional.one_hot(torch.arange(40) % 8, 1008).double() * 60  # 8 classes, evenly
    assert inception_score(confident) == pytest.approx(8.0, rel=1e-9)
    assert inception_score(torch.zeros(10, 1008)) == pytest.approx(1.0)  # one prediction for every image
    logits = torch.randn(30, 1008, dtype=torch.float64) * 3
    p = logits.softmax(1).numpy()

    def adm(part):  # ADM's evaluator's formula, on probabilities
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        return np.exp(np.mean(np.sum(kl, 1)))

    assert inception_score(logits, split_size=10) == pytest.approx(np.mean([adm(p[i : i + 10]) for i in (0, 10, 20)]))


@pytest.mark.parametrize(
    "arrays,match",
    [
        (dict(mu=np.zeros(2048)), "no sigma in it (it holds mu)"),
        (dict(pictures=np.zeros((4, 8, 8, 3), np.uint8)), "no arr_0 or images in it (it holds pictures)"),
        (dict(mu=np.zeros(2048), sigma=np.eye(10)), "not a mean (d,) and a covariance (d, d)"),
        (dict(mu=np.zeros(64), sigma=np.eye(64)), "statistics of 64 features; the Inception network's are 2048"),
        (dict(arr_0=np.zeros((4, 8, 8, 3), np.float32)), "its images are float32"),
    ],
)
def test_bad_reference_statistics_are_one_line_naming_the_file(tmp_path, cli, weights, arrays, match):
    """Bug: a reference file without mu/sigma or images ended in a KeyError traceback after the samples' Inception
    features had been computed (an hour for 50,000 images)."""
    np.savez(tmp_path / "ref.npz", **arrays)
    np.savez(tmp_path / "gen.npz", arr_0=_pixels(4))
    err = _one_line_error(cli, ["--samples", tmp_path / "gen.npz", "--inception", weights,
                                "--ref-stats", tmp_path / "ref.npz"], match)  # fmt: skip
    assert str(tmp_path / "ref.npz") in err


def test_unreadable_files_are_one_line_naming_the_file_and_the_keys(tmp_path, cli, weights):
    """Bugs: a truncated reference or a samples file in another layout reported as a zipfile or KeyError
    traceback, without the file or the keys it holds."""
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 truncated")
    np.savez(tmp_path / "gen.npz", arr_0=_pixels(4))
    np.savez(tmp_path / "other.npz", x=_pixels(4))
    inception = ["--inception", weights]
    _one_line_error(cli, ["--samples", tmp_path / "gen.npz", *inception, "--ref-stats", tmp_path / "cut.npz"],
                    f"cannot read reference statistics {tmp_path / 'cut.npz'}")  # fmt: skip
    _one_line_error(cli, ["--samples", tmp_path / "gen.npz", *inception, "--ref-stats", tmp_path / "none.npz"],
                    "No such file")  # fmt: skip
    _one_line_error(cli, ["--samples", tmp_path / "other.npz", *inception, "--ref-stats", tmp_path / "gen.npz"],
                    f"images {tmp_path / 'other.npz'} (uint8 (N, H, W, C) under arr_0 or images): no arr_0 or "
                    "images in it (it holds x)")  # fmt: skip
    with pytest.raises(evaluate.InputError, match="need the Inception network"):
        read_inception_stats(tmp_path / "gen.npz")  # images, and no network to compute their statistics


@pytest.mark.parametrize(
    "args,match",
    [
        (["--samples", "s.npz", "--ref-stats", "r.npz"], "--ref-stats needs --inception"),
        (["--samples", "s.npz", "--save-stats", "o.npz"], "--save-stats needs --inception"),
        (["--ckpt", "c.pt", "--inception", "w.pth", "--save-stats", "o.npz"], "not of a sweep"),
        (["--samples", "s.npz", "--inception", "w.pth", "--save-stats", "stats"], "ending in .npz"),
        (["--inception", "w.pth", "--save-stats", "o.npz"], "--save-stats needs --samples FILE or --dataset"),
        (["--samples", "s.npz", "--inception", "w.pth"], "--samples needs --dataset"),
        (["--samples", "s.npz", "--inception", "w.pth", "--ref-stats", "r.npz"], "cannot load Inception FID weights"),
    ],
)
def test_command_line_mistakes_are_one_line_and_exit_2(tmp_path, cli, monkeypatch, args, match):
    """Bug: flags that cannot work together (statistics without a network, stats of a sweep) accepted, and
    failing after the sampling or scoring they followed."""
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "s.npz", arr_0=_pixels(5))
    _one_line_error(cli, args, match)


def test_save_stats_of_a_dataset_match_its_reference(tmp_path, cli, weights, net, monkeypatch):
    """Bug: a dataset's saved statistics taken of other images than the ones --dataset compares with (the
    training split, or unquantised)."""
    from fpdm.data import ImageData

    images = quantize(torch.rand(5, 1, 8, 8) * 2 - 1)
    fake = ImageData(images=images, labels=torch.arange(5) % 2, num_classes=2, name="tiny")
    monkeypatch.setattr(evaluate, "load_dataset", lambda name, split, data_dir=None: fake)
    _run(cli, "--save-stats", tmp_path / "tiny.npz", "--inception", weights, "--dataset", "tiny")
    saved = read_inception_stats(tmp_path / "tiny.npz", net)
    expected = feature_stats(inception_features(net, images))
    assert isinstance(saved, FeatureStats)
    assert np.array_equal(saved.mu, expected.mu) and np.array_equal(saved.sigma, expected.sigma)

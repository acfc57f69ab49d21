"""Evaluation: Frechet distance against closed forms, the feature network, Inception FID, budget sweeps."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fpdm.evaluate import Reference, feature_net_for, frechet_distance, reference_for, score, trace_sqrt_product


def test_frechet_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 8)) @ rng.normal(size=(8, 8))
    assert abs(frechet_distance(a, a)) < 1e-8
    distances = [frechet_distance(a, a + shift) for shift in (0.1, 0.5, 2.0)]
    np.testing.assert_allclose(distances, [8 * 0.01, 8 * 0.25, 8 * 4.0], rtol=1e-6)  # ||shift * 1||^2


def test_frechet_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(50_000, 3)) * np.array([1.0, 2.0, 0.5])
    b = rng.normal(size=(50_000, 3)) * np.array([2.0, 2.0, 1.5]) + np.array([1.0, 0.0, 0.0])
    # ||mu_a - mu_b||^2 + sum (s_a - s_b)^2 for diagonal covariances with standard deviations s
    expected = 1.0 + (1 - 2) ** 2 + 0 + (0.5 - 1.5) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("n", [6, 40])  # fewer samples than dimensions (rank-deficient), and more
def test_both_ways_to_the_trace_of_the_covariance_product_agree_with_sqrtm(n):
    """Tr((S_a S_b)^(1/2)) from the centred samples' singular values and from symmetric eigendecompositions
    equals scipy.linalg.sqrtm's (what pytorch-fid computes). Catches: a wrong normalisation ((n - 1) vs n) in
    the samples' form, S_a S_b's eigenvalues taken without the square root, a transposed product."""
    import scipy.linalg

    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, 12)) @ rng.normal(size=(12, 12))
    b = rng.normal(size=(n + 3, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 2.0
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = np.trace(scipy.linalg.sqrtm(cov_a @ cov_b).real)
    centred = a - a.mean(0), b - b.mean(0)
    for from_samples in (True, False):
        got = trace_sqrt_product(*centred, cov_a, cov_b, from_samples=from_samples)
        assert got == pytest.approx(expected, rel=1e-7), from_samples


@pytest.fixture(scope="module")
def cache_dir(feature_cache):
    """The session's feature-network cache: the digits classifier is trained once."""
    return feature_cache


@pytest.fixture(scope="module")
def digits_reference(cache_dir):
    return reference_for("digits", cache_dir=cache_dir, progress=False)


def test_feature_network_is_accurate_and_cached(digits_reference, tmp_path):
    assert digits_reference.record["test_accuracy"] > 0.9
    first, record = feature_net_for("digits", cache_dir=tmp_path, epochs=2, progress=False)
    again, record_again = feature_net_for("digits", cache_dir=tmp_path, progress=False)
    assert record == record_again and record["epochs"] == 2  # the second call loaded the cache
    for p, q in zip(first.parameters(), again.parameters()):
        assert torch.equal(p, q)
    (tmp_path / "featurenet-digits.pt").write_bytes(b"corrupt")
    _, retrained = feature_net_for("digits", cache_dir=tmp_path, epochs=1, progress=False)
    assert retrained["epochs"] == 1  # an unreadable cache is replaced, not trusted


def test_real_images_score_like_the_real_test_set(digits_reference):
    from fpdm.data import load_dataset

    test = load_dataset("digits", split="test")
    result = score(test.images, test.labels, digits_reference)
    assert abs(result["frechet"]) < 1e-6
    assert result["cond_accuracy"] == pytest.approx(digits_reference.record["test_accuracy"])
    noisy = score(test.images + 0.5 * torch.randn_like(test.images), test.labels, digits_reference)
    assert noisy["frechet"] > 1.0 and noisy["cond_accuracy"] < result["cond_accuracy"]
    shuffled = score(test.images, test.labels.roll(1), digits_reference)
    assert shuffled["cond_accuracy"] < 0.3


def test_inception_fid_with_random_weights_of_the_same_architecture(tmp_path, digits_reference):
    from fpdm.evaluate import feature_stats, inception_features
    from fpdm.inception import FIDInceptionV3, load_fid_inception
    from fpdm.metrics import frechet_to_moments

    torch.manual_seed(0)
    net = FIDInceptionV3()
    for module in net.modules():  # random but non-degenerate batch-norm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
            module.running_mean.normal_(0, 0.1)
    torch.save(net.state_dict(), tmp_path / "pt_inception.pth")
    loaded = load_fid_inception(tmp_path / "pt_inception.pth")
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        features = loaded(images)
    assert features.shape == (6, 2048) and torch.isfinite(features).all()
    assert features.std(dim=0).max() > 0  # different images, different features
    reference = feature_stats(inception_features(loaded, images))  # quantised to uint8, as saved samples are
    ref = Reference(digits_reference.net, digits_reference.real_features, digits_reference.record, images,
                    loaded, reference)  # fmt: skip
    same = score(images, torch.zeros(6, dtype=torch.long), ref)
    shifted_images = (images + 0.8).clamp(-1, 1)
    shifted = score(shifted_images, torch.zeros(6, dtype=torch.long), ref)
    expected = frechet_to_moments(inception_features(loaded, shifted_images), *reference)
    assert abs(same["inception_fid"]) <= 1e-6 * abs(expected)
    assert shifted["inception_fid"] == expected > 0 and same["inception_score"] > 1 - 1e-9
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="cannot load Inception FID weights"):
        load_fid_inception(tmp_path / "bad.pth")


def test_budget_sweep_command(tmp_path, cache_dir, digits_reference, trained_checkpoint):
    dit, fpdm = str(trained_checkpoint("DiT-T/2")), str(trained_checkpoint("FPDM-T/2"))
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "fpdm.evaluate", "--ckpt", dit, "--ckpt", fpdm, "--dit-steps", "2,4",
           "--variants", "uniform,smoothing,reuse,anderson", "--num-samples", "40", "--cache-dir", str(cache_dir),
           "--out", str(out), "--quiet"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 2 * (1 + 4)
    for row in rows:
        assert row["block_evaluations"] == row["budget"] == row["dit_steps"] * 4  # DiT-T depth 4
        assert np.isfinite(row["frechet"]) and 0 <= row["cond_accuracy"] <= 1
    smoothing = [r for r in rows if r["variant"] == "smoothing" and r["dit_steps"] == 4][0]
    assert smoothing["steps"] > 4  # more steps, fewer iterations each
    assert (out / "results.md").read_text().count("\n| ") >= 10
    assert (out / "quality_vs_compute.png").is_file() and any((out / "grids").iterdir())


def test_score_existing_samples_and_bad_input(tmp_path, cache_dir, digits_reference, cli, trained_checkpoint):
    ckpt = str(trained_checkpoint("DiT-T/2"))
    subprocess.run([sys.executable, "-m", "fpdm.sample", "--ckpt", ckpt, "--num-samples", "20", "--steps", "3",
                    "--out", str(tmp_path / "s"), "--quiet"], check=True, capture_output=True, timeout=120)  # fmt: skip
    base = [sys.executable, "-m", "fpdm.evaluate", "--cache-dir", str(cache_dir), "--quiet"]
    ok = subprocess.run([*base, "--samples", str(tmp_path / "s" / "samples.npz"), "--dataset", "digits"],
                        capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["frechet"] > 0 and 0 <= result["cond_accuracy"] <= 1
    np.save(tmp_path / "s" / "x.npy", np.zeros(3))  # an array, not a samples.npz
    images = np.zeros((20, 8, 8, 1), np.uint8)
    np.savez(tmp_path / "s" / "few_labels.npz", images=images, labels=np.zeros(5, np.int64))
    np.savez(tmp_path / "s" / "one.npz", images=images[:1], labels=np.zeros(1, np.int64))
    folder = tmp_path / "imgs" / "a"  # a model of another image shape (3x32x32: folders default to 32)
    folder.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(folder / f"{i}.png")
    other = tmp_path / "other"
    train = [sys.executable, "-m", "fpdm.train", "--model", "DiT-T/2", "--steps", "1", "--batch-size", "2",
             "--sample-steps", "0", "--quiet", "--dataset", f"folder:{tmp_path / 'imgs'}",
             "--out", str(other)]  # fmt: skip
    assert subprocess.run(train, capture_output=True, timeout=120).returncode == 0
    for args, match in (
        (["--samples", str(tmp_path / "s" / "samples.npz")], "--samples needs --dataset"),
        (["--ckpt", ckpt, "--variants", "magic"], "unknown variant(s) magic"),
        (["--ckpt", str(tmp_path / "none.pt")], "is unreadable"),
        ([], "give --samples FILE or at least one --ckpt"),
        (["--samples", str(tmp_path / "s" / "x.npy"), "--dataset", "digits"], "cannot read samples"),
        (["--ckpt", ckpt, "--batch-size", "0"], "--batch-size and --dit-depth must be >= 1"),
        (["--ckpt", ckpt, "--dit-steps", "2000", "--out", str(tmp_path / "e")], "more than the 1000 diffusion"),
        (["--ckpt", ckpt, "--out", str(tmp_path / "s" / "samples.npz")], "is a file, not a directory"),
        (["--samples", str(tmp_path / "s" / "few_labels.npz"), "--dataset", "digits"], "of shape (5,) for 20 images"),
        (["--samples", str(tmp_path / "s" / "one.npz"), "--dataset", "digits"], "needs at least 2"),
        (
            ["--ckpt", ckpt, "--ckpt", str(other / "checkpoints" / "latest.pt"), "--out", str(tmp_path / "e2")],
            "generate different shapes (1x8x8, 3x32x32)",
        ),
        (["--ckpt", ckpt, "--seed", "-1"], "--seed: expected an integer in [0, 2^32)"),
    ):
        code, _, err = cli("fpdm.evaluate", [*base[3:], *args])
        assert code == 2 and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1 and match in err


def test_a_sweep_reads_each_checkpoint_once(tmp_path, cache_dir, digits_reference, monkeypatch, trained_checkpoint):
    """Every checkpoint is read once, before the reference (whose feature network may have to train)."""
    import fpdm.evaluate
    import fpdm.weights

    ckpt = str(trained_checkpoint("FPDM-T/2"))
    reads, read, load = [], fpdm.weights.read_file, fpdm.evaluate.load_checkpoint
    monkeypatch.setattr(fpdm.weights, "read_file", lambda path: reads.append(str(path)) or read(path))
    # the evaluation also reads its cached feature network
    monkeypatch.setattr(fpdm.evaluate, "load_checkpoint",
                        lambda path, **kw: reads.append(str(path)) or load(path, **kw))  # fmt: skip
    code = fpdm.evaluate.cli(["--ckpt", ckpt, "--dit-steps", "2", "--dit-depth", "4", "--variants", "uniform",
                              "--num-samples", "10", "--cache-dir", str(cache_dir), "--out", str(tmp_path / "e"),
                              "--quiet"])  # fmt: skip
    assert code == 0 and reads.count(ckpt) == 1 and reads[0] == ckpt  # before the feature network's read
    assert len(json.loads((tmp_path / "e" / "results.json").read_text())) == 1

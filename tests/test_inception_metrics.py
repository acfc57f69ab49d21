"""ADM's other numbers and reference implementations: TF1's resize, sFID's spatial features, precision and recall
(Kynkaanniemi et al.), torch-fidelity's values on the same images and weights, the Inception features over
torchrun's ranks. With a randomly initialised FID Inception of the real architecture (nothing is downloaded)."""

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fidelity import import_torch_fidelity
from processes import launch
from scipy.spatial.distance import cdist

from fpdm.fid import InceptionFeatures, inception_outputs
from fpdm.inception import load_fid_inception, resize_bilinear_tf1
from fpdm.metrics import feature_stats, frechet_from_moments, frechet_to_moments, precision_recall
from fpdm.testing import save_random_fid_inception


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_random_fid_inception(tmp_path_factory.mktemp("inception") / "pt_inception.pth")


@pytest.fixture(scope="module")
def net(weights):
    return load_fid_inception(weights)


def _pixels(seed: int, n: int = 6, channels: int = 3, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def _run(cli, *args) -> dict:
    code, out, err = cli("fpdm.evaluate", [*[str(a) for a in args], "--quiet"])
    assert code == 0, err
    return json.loads(out)


# ----------------------------------------------------------------------------- TF1's resize


def test_tf1_resize_samples_at_i_times_in_over_out_without_half_pixel_centres():
    """Bug: PyTorch's half-pixel bilinear (pytorch-fid's) where ADM's graph has TF1's: 0 2.5 7.5 10 instead of
    0 5 10 10 for a 2-pixel ramp doubled; or the last pixel not repeated past the edge."""
    ramp = torch.tensor([[[[0.0, 10.0]]]])  # (1, 1, 1, 2)
    wide = resize_bilinear_tf1(ramp.expand(1, 1, 2, 2), 4)
    assert torch.equal(wide[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    assert torch.equal(wide[0, 0], wide[0, 0, :1].expand(4, 4))  # constant along the other axis
    assert not torch.equal(wide, F.interpolate(ramp.expand(1, 1, 2, 2), size=4, mode="bilinear", align_corners=False))
    image = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(resize_bilinear_tf1(image, 2), image[:, :, ::2, ::2])  # down by 2: every other pixel, no mean
    assert torch.equal(resize_bilinear_tf1(image, 4), image)


def test_tf1_resize_equals_torch_fidelitys_bit_for_bit():
    """Bug: another operation order than torch-fidelity's TF1-exact resize (its 'slow' method): features that
    differ from its (and TF's) in the last bits, amplified through 94 layers."""
    import_torch_fidelity()
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = torch.from_numpy(_pixels(0, n=2, size=13)).permute(0, 3, 1, 2).float()
    for size in (299, 7, 13):
        theirs = interpolate_bilinear_2d_like_tensorflow1x(x, size=(size, size), align_corners=False)
        assert torch.equal(resize_bilinear_tf1(x, size), theirs)


# ----------------------------------------------------------------------------- sFID's features


def test_spatial_features_are_mixed_6d_1x1_branch_first_7_channels_in_tf_order(net):
    """Bugs: another block (Mixed_6e, as one port has it) than TF's mixed_6/conv (Mixed_6d.branch1x1 in the
    weights' conversion), before its ReLU, or flattened (C, H, W) where ADM's mu_s is (H, W, C): sFID against
    an ADM reference batch would compare other coordinates."""
    seen = {}
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: seen.setdefault("out", out))
    try:
        features = inception_outputs(net, _pixels(1, n=2))
    finally:
        hook.remove()
    assert features.spatial.shape == (2, 17 * 17 * 7) and features.pool.shape == (2, 2048)
    expected = seen["out"][:, :7].permute(0, 2, 3, 1).reshape(2, -1).double().numpy()  # (N, H, W, 7)
    assert np.array_equal(features.spatial, expected) and (expected >= 0).all() and expected.max() > 0


def test_each_input_prepares_pixels_as_its_reference_implementation(weights):
    """Bugs: --inception-input ignored (one path for both), TF's (p - 128) / 128 written as p / 127.5 - 1, or
    pytorch-fid's path changed from before 0.3 (it must stay F.interpolate of p / 127.5 - 1); grayscale not
    repeated to 3 channels."""
    pixels = torch.from_numpy(_pixels(2, n=2, channels=1)).permute(0, 3, 1, 2).float()
    rgb = pixels.expand(-1, 3, -1, -1)
    tf1, old = load_fid_inception(weights, "tf1"), load_fid_inception(weights, "pytorch-fid")
    assert torch.equal(tf1.prepare(pixels), (resize_bilinear_tf1(rgb, 299) - 128) / 128)
    expected = F.interpolate(rgb / 127.5 - 1, size=(299, 299), mode="bilinear", align_corners=False)
    assert torch.equal(old.prepare(pixels), expected)
    with torch.no_grad():
        assert torch.equal(old.pixel_features(pixels)[0], old.trunk(expected)[0])
    assert not torch.allclose(tf1.prepare(pixels), expected, atol=1e-3)
    with pytest.raises(ValueError, match="input must be one of tf1, pytorch-fid, got 'tf2'"):
        load_fid_inception(weights, "tf2")


# ----------------------------------------------------------------------------- precision and recall


def _brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        return np.sort(cdist(x, x), axis=1)[:, k]  # column 0 is the point itself

    precision = (cdist(fake, real) <= radii(real)[None]).any(1).mean()
    recall = (cdist(real, fake) <= radii(fake)[None]).any(1).mean()
    return precision, recall


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_equal_a_brute_force_count_in_any_blocking(k):
    """Bugs: the point itself counted as its first neighbour (radii too small), precision and recall swapped,
    or blocks that lose a column (a ball missed when the sets do not fit one block)."""
    rng = np.random.default_rng(0)
    real = rng.normal(size=(37, 5))
    fake = rng.normal(loc=0.6, scale=0.7, size=(23, 5))
    expected = _brute_precision_recall(real, fake, k)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1 and expected[0] != expected[1]
    for block in (4, 10, 1000):
        assert precision_recall(real, fake, k=k, batch_size=block) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_closed_forms_and_errors():
    """Bugs: a set against itself below 1, disjoint sets above 0, or too few points given an index error."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 3))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100) == (0.0, 0.0)
    from fpdm.checks import InputError

    with pytest.raises(InputError, match="more than 3 points in each set, got 20 real and 3 fake"):
        precision_recall(x, x[:3])
    with pytest.raises(InputError, match=r"\(20, 3\) and \(20, 4\)"):
        precision_recall(x, rng.normal(size=(20, 4)))


@pytest.mark.parametrize("n", [5, 40])
def test_frechet_to_moments_through_the_samples_equals_the_moments_formula(n):
    """Bug: the (N, N) shortcut with N - 1 and N mixed up, or without the centring: FID of few samples against
    FID-50K statistics off by a term that does not vanish. n = 5 < d = 12: the shortcut; n = 40: the moments."""
    rng = np.random.default_rng(2)
    a = rng.normal(size=(n, 12)) * np.linspace(0.5, 2, 12)
    b = rng.normal(loc=0.3, size=(30, 12)) @ rng.normal(size=(12, 12)) / 4
    stats = feature_stats(b)
    expected = frechet_from_moments(*feature_stats(a), *stats)
    # n = 5: the moments formula adds the square roots of 7 rounding-level eigenvalues (~1e-8 each)
    assert frechet_to_moments(a, *stats) == pytest.approx(expected, rel=1e-9 if n > 12 else 1e-6)
    assert frechet_to_moments(a[:3], *feature_stats(a[:3])) == pytest.approx(0, abs=1e-12)  # a set with itself


# ----------------------------------------------------------------------------- the command


def test_the_command_reports_sfid_precision_recall_and_saved_statistics_give_the_same_sfid(tmp_path, cli, weights, net):
    """Bugs: sFID from the pool features, statistics files without sFID's mu_s/sigma_s (an ADM-style reference
    could not give it), or precision/recall computed against the statistics instead of the reference images."""
    gen, ref = _pixels(3), _pixels(4)
    np.savez(tmp_path / "gen.npz", arr_0=gen, labels=np.arange(6))
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    inception = ["--inception", weights]
    by_images = _run(cli, "--samples", tmp_path / "gen.npz", *inception, "--ref-stats", tmp_path / "ref.npz")
    ours, theirs = inception_outputs(net, gen), inception_outputs(net, ref)
    assert by_images["sfid"] == frechet_to_moments(ours.spatial, *feature_stats(theirs.spatial))
    assert (by_images["precision"], by_images["recall"]) == precision_recall(theirs.pool, ours.pool)
    _run(cli, "--save-stats", tmp_path / "stats.npz", *inception, "--samples", tmp_path / "ref.npz")
    with np.load(tmp_path / "stats.npz") as saved:
        assert sorted(saved.files) == ["input", "mu", "mu_s", "sigma", "sigma_s"] and str(saved["input"]) == "tf1"
        assert saved["mu_s"].shape == (2023,) and saved["sigma_s"].shape == (2023, 2023)
    by_stats = _run(cli, "--samples", tmp_path / "gen.npz", *inception, "--ref-stats", tmp_path / "stats.npz")
    assert by_stats["sfid"] == by_images["sfid"] and by_stats["inception_fid"] == by_images["inception_fid"]
    assert "precision" not in by_stats  # statistics hold no images: no manifold to compare with
    np.savez(tmp_path / "pool.npz", mu=np.zeros(2048), sigma=np.eye(2048))  # pytorch-fid's kind of file
    assert "sfid" not in _run(cli, "--samples", tmp_path / "gen.npz", *inception, "--ref-stats", tmp_path / "pool.npz")


def test_statistics_of_another_input_are_refused_in_one_line(tmp_path, cli, weights):
    """Bug: statistics computed with TF1's resize compared with features of pytorch-fid's: an FID off by the
    resize's difference, silently."""
    np.savez(tmp_path / "gen.npz", arr_0=_pixels(5), labels=np.arange(6))
    _run(cli, "--save-stats", tmp_path / "stats.npz", "--inception", weights, "--samples", tmp_path / "gen.npz")
    args = ["--samples", tmp_path / "gen.npz", "--inception", weights, "--inception-input", "pytorch-fid",
            "--ref-stats", tmp_path / "stats.npz"]  # fmt: skip
    code, _, err = cli("fpdm.evaluate", [str(a) for a in args])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "statistics are of the tf1 input; this network's is pytorch-fid" in err


# ----------------------------------------------------------------------------- torch-fidelity


def test_our_features_fid_precision_recall_equal_torch_fidelitys(tmp_path, cli, weights):
    """The fid extra's promise: on the same uint8 images and the same weights file, our pool features are
    torch-fidelity's (its extractor, its TF1 resize) and FID, precision and recall are its values. Bugs: any
    difference in the input path (resize, scaling, grayscale), or in the metric definitions."""
    import_torch_fidelity()
    gen, ref = _pixels(6, n=5, size=12), _pixels(7, n=6, size=12)
    np.savez(tmp_path / "gen.npz", arr_0=gen, labels=np.arange(5))
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    out = _run(cli, "--samples", tmp_path / "gen.npz", "--inception", weights, "--ref-stats", tmp_path / "ref.npz",
               "--cross-check")  # fmt: skip
    theirs = out["torch_fidelity"]
    assert theirs["max_feature_difference"] < 1e-5  # float32 features of O(1): the same to rounding
    # 5 and 6 images in 2048 dimensions: singular covariances, whose ~2040 rounding-level eigenvalues'
    # square roots add up to ~1e-2 in torch-fidelity's eig of the product (ours takes the samples' exact
    # shortcut); the definitions agree to 1e-9 where the covariances are not singular (the next test)
    assert theirs["inception_fid"] == pytest.approx(out["inception_fid"], rel=2e-5)
    assert (theirs["precision"], theirs["recall"]) == pytest.approx((out["precision"], out["recall"]), abs=1e-6)


def test_our_fid_and_precision_recall_functions_equal_torch_fidelitys():
    """Bugs: another FID definition (N vs N - 1 covariances, a missing trace term) or another manifold rule
    (the k-th neighbour counted from 0 or 1, < for <=) than torch-fidelity's, on features where both are
    well conditioned (N > d)."""
    import_torch_fidelity()
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    rng = np.random.default_rng(3)
    real = rng.normal(size=(300, 16))
    fake = rng.normal(loc=0.4, scale=0.8, size=(200, 16)) @ (np.eye(16) + rng.normal(size=(16, 16)) / 8)
    stats = [fid_features_to_statistics(torch.from_numpy(f)) for f in (fake, real)]
    theirs = fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    assert frechet_to_moments(fake, *feature_stats(real)) == pytest.approx(theirs, rel=1e-9)
    f32 = [torch.from_numpy(x).float() for x in (fake, real)]
    theirs = calculate_precision_recall_full(*f32, neighborhood=3)  # float32 means
    assert precision_recall(real, fake) == pytest.approx(theirs, abs=1e-6) and 0 < theirs[1] < theirs[0] < 1


# ----------------------------------------------------------------------------- torchrun


def test_two_ranks_extract_the_one_process_features_bit_for_bit(tmp_path, weights):
    """Bugs: ranks computing overlapping or missing batches, the gather reordering them, or rank 1 writing or
    printing too: the 2-rank numbers and statistics file must be the 1-process ones exactly."""
    np.savez(tmp_path / "gen.npz", arr_0=_pixels(8, n=7), labels=np.arange(7))
    np.savez(tmp_path / "ref.npz", arr_0=_pixels(9, n=5))
    args = ["-m", "fpdm.evaluate", "--samples", str(tmp_path / "gen.npz"), "--inception", str(weights),
            "--ref-stats", str(tmp_path / "ref.npz"), "--quiet", "--device", "cpu"]  # fmt: skip
    one = launch([sys.executable, *args, "--save-stats", str(tmp_path / "one.npz")], tmp_path, "one", "fpdm.evaluate")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = launch([*torchrun, *args, "--save-stats", str(tmp_path / "two.npz")], tmp_path, "two", "fpdm.evaluate")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
    assert two.stdout.count("inception_fid") == 1  # rank 0 prints
    assert json.loads(two.stdout)["inception_fid"] == json.loads(one.stdout)["inception_fid"]
    assert {k: v for k, v in json.loads(two.stdout).items() if k != "saved_stats"} == {
        k: v for k, v in json.loads(one.stdout).items() if k != "saved_stats"}  # fmt: skip
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_inception_outputs_gathers_any_split_over_ranks_in_order(net, monkeypatch):
    """Bug: the gather's reassembly wrong for a last, short batch or a rank without batches: simulated here with
    the collective replaced by each rank's own computation (what all_gather would deliver)."""
    import fpdm.fid as fid

    whole = inception_outputs(net, _pixels(10, n=7), batch_size=2)
    rows = torch.from_numpy(np.concatenate([whole.pool, whole.spatial], 1))  # (7, 2048 + 2023): 4 batches of 2
    for world in (2, 3, 5):
        shares = [torch.cat([rows[b * 2 : (b + 1) * 2] for b in range(rank, 4, world)] or [rows[:0]])
                  for rank in range(world)]  # rank r: batches r, r + world, ... (rank 4 of 5: none)  # fmt: skip

        def all_gather(parts, padded, shares=shares):
            for part, share in zip(parts, shares):
                part.copy_(torch.cat([share, share.new_zeros(len(padded) - len(share), share.shape[1])]))

        monkeypatch.setattr(fid.dist, "all_gather", all_gather)
        assert torch.equal(fid._gathered(shares[0], 7, 2, world), rows)
    assert isinstance(whole, InceptionFeatures)

"""Datasets and VAE latents: values, shapes, and the errors for missing data."""

import gzip

import numpy as np
import pytest
import torch

from fpdm.data import DataError, load_dataset


def test_digits_train_and_test_split():
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    assert set(train.labels.tolist()) == set(range(10)) and train.num_classes == 10
    from sklearn.datasets import load_digits

    raw = load_digits()
    torch.testing.assert_close(test.images[0, 0], torch.from_numpy(raw.images[0]).float() / 8 - 1)


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    labels = np.array([0, 3, 9, 1, 1])
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    data = load_dataset("fashion-mnist", split="test", data_dir=str(tmp_path))
    assert data.images.shape == (5, 1, 28, 28) and data.labels.tolist() == labels.tolist()
    torch.testing.assert_close(data.images[2, 0], torch.from_numpy(images[2]).float() / 255 * 2 - 1)


def test_damaged_fashion_mnist_files_are_one_line_errors(tmp_path):
    """A truncated .gz, and a labels file that does not match the images file, name the problem."""
    images = np.zeros((5, 28, 28))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3))
    with pytest.raises(DataError, match=r"images \(5, 28, 28\) and t10k-labels-idx1-ubyte.gz labels \(3,\)"):
        load_dataset("fashion-mnist", split="test", data_dir=str(tmp_path))
    whole = (tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="cannot read Fashion-MNIST"):
        load_dataset("fashion-mnist", split="test", data_dir=str(tmp_path))


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path))


def test_image_folder(tmp_path):
    from PIL import Image

    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.new("RGB", (20, 12), color).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    data = load_dataset(f"folder:{tmp_path}", image_size=8)
    assert data.images.shape == (4, 3, 8, 8) and data.labels.tolist() == [0, 0, 1, 1] and data.num_classes == 2
    torch.testing.assert_close(data.images[0, :, 4, 4], torch.tensor([1.0, -1.0, -1.0]))
    with pytest.raises(DataError, match="no class subfolders"):
        load_dataset(f"folder:{tmp_path / 'cat'}")


def test_unreadable_images_and_latent_shards_are_one_line_errors(tmp_path):
    from PIL import Image

    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "cat" / "0.png")
    (tmp_path / "imgs" / "cat" / "1.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*1\.png"):
        load_dataset(f"folder:{tmp_path / 'imgs'}")

    shards = tmp_path / "latents"
    shards.mkdir()
    np.savez(shards / "a.npz", latents=np.zeros((2, 4, 2, 2), np.float16), labels=np.zeros(2), num_classes=2)
    (shards / "b.npz.tmp").write_bytes(b"an unfinished shard: never read")
    assert len(load_dataset(f"latents:{shards}")) == 2
    np.savez(shards / "b.npz", latents=np.zeros((2, 4, 4, 4), np.float16), labels=np.zeros(2), num_classes=2)
    with pytest.raises(DataError, match="one encoding per folder"):
        load_dataset(f"latents:{shards}")
    np.savez(shards / "b.npz", latents=np.zeros((0, 4, 2, 2), np.float16), labels=np.zeros(0), num_classes=2)
    with pytest.raises(DataError, match="expected .* N >= 1"):
        load_dataset(f"latents:{shards}")
    (shards / "b.npz").write_bytes((shards / "a.npz").read_bytes()[:50])  # truncated
    with pytest.raises(DataError, match="cannot read latent shard"):
        load_dataset(f"latents:{shards}")
    np.savez(shards / "b.npz", latents=np.zeros((2, 4, 2, 2), np.float16), labels=-np.ones(2), num_classes=2)
    with pytest.raises(DataError, match="hold label -1; labels are class indices >= 0"):
        load_dataset(f"latents:{shards}")


def _tiny_vae(path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        sample_size=16,
    )  # fmt: skip
    vae.save_pretrained(path)
    return vae


def test_encode_writes_latent_shards_that_train_reads(tmp_path):
    pytest.importorskip("diffusers")
    from PIL import Image

    from fpdm.encode import cli, decode, load_vae

    images = tmp_path / "images"
    for cls in ("a", "b"):
        (images / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
                images / cls / f"{i}.png"
            )
    vae = _tiny_vae(tmp_path / "vae")
    out = tmp_path / "latents"
    args = ["--dataset", f"folder:{images}", "--vae", str(tmp_path / "vae"), "--out", str(out), "--image-size", "16"]
    assert cli([*args, "--shard-size", "4", "--quiet", "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".lock", "latents-00000.npz", "latents-00001.npz"]
    data = load_dataset(f"latents:{out}")
    assert data.images.shape == (6, 4, 8, 8) and data.is_latent and data.num_classes == 2
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # the latents are posterior samples of the VAE, scaled by its scaling factor, drawn from --seed
    source = load_dataset(f"folder:{images}", image_size=16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        expected = [vae.encode(source.images[i : i + 4]).latent_dist.sample(generator=gen) for i in (0, 4)]
    expected = torch.cat(expected) * vae.config.scaling_factor
    torch.testing.assert_close(data.images, expected.half().float())
    decoded = decode(load_vae(str(tmp_path / "vae"), torch.device("cpu")), data.images[:2])
    assert decoded.shape == (2, 3, 16, 16)


def test_encode_bad_vae_path_is_one_line(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from fpdm.encode import cli

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a" / "0.png")
    code = cli(["--dataset", f"folder:{tmp_path / 'imgs'}", "--vae", str(tmp_path / "none"), "--out",
                str(tmp_path / "o"), "--quiet"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot load an AutoencoderKL")

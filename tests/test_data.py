"""Datasets and VAE latents: values, shapes, and the errors for missing data."""

import gzip
import json

import numpy as np
import pytest
import torch

from fpdm.data import DataError, load_dataset
from fpdm.testing import save_tiny_vae


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
    return save_tiny_vae(path)


def _image_folder(root, sizes=((16, 16),) * 3, classes=("a", "b")):
    from PIL import Image

    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            pixels = np.random.default_rng(10 * c + i).integers(0, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def _encode(tmp_path, out, *extra, images=None):
    from fpdm.encode import cli

    images = images or tmp_path / "images"
    args = ["--dataset", f"folder:{images}", "--vae", str(tmp_path / "vae"), "--out", str(out), "--image-size",
            "16", "--shard-size", "4", "--batch-size", "2", "--quiet", "--device", "cpu", "--workers", "0",
            *extra]  # fmt: skip
    return cli(args)


def _shard_generator(shard):
    return torch.Generator().manual_seed(0 * 1_000_003 + shard)  # --seed 0: each shard's own posterior draws


def test_encode_writes_latent_shards_that_train_reads(tmp_path):
    """Shards and a manifest that training reads back: catches latents that are not the VAE's scaled posterior
    samples of the centre-cropped images, or labels out of step with them."""
    pytest.importorskip("diffusers")
    from fpdm.encode import decode, load_vae

    images = _image_folder(tmp_path / "images")
    vae = _tiny_vae(tmp_path / "vae")
    out = tmp_path / "latents"
    assert _encode(tmp_path, out) == 0
    assert sorted(p.name for p in out.iterdir()) == [".lock", "latents-00000.npz", "latents-00001.npz", "manifest.json"]
    data = load_dataset(f"latents:{out}")
    assert data.images.shape == (6, 4, 8, 8) and data.is_latent and data.num_classes == 2
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # the latents are posterior samples of the VAE, scaled by its scaling factor, each shard's from its own seed
    source = load_dataset(f"folder:{images}", image_size=16)
    expected = []
    with torch.no_grad():
        for shard, batches in enumerate([(0, 2), (4,)]):
            gen = _shard_generator(shard)
            expected += [vae.encode(source.images[i : i + 2]).latent_dist.sample(generator=gen) for i in batches]
    expected = torch.cat(expected) * vae.config.scaling_factor
    torch.testing.assert_close(data.images, expected.half().float())
    decoded = decode(load_vae(str(tmp_path / "vae"), torch.device("cpu")), data.images[:2])
    assert decoded.shape == (2, 3, 16, 16)


def test_an_interrupted_encode_resumes_without_redoing_finished_shards(tmp_path, monkeypatch):
    """Ctrl-C in shard 1, then the same command: catches a resume that decodes the finished shard again, loses
    the partial one, or draws other posterior samples than an uninterrupted run (a generator carried across
    shards would)."""
    pytest.importorskip("diffusers")
    import fpdm.data

    _image_folder(tmp_path / "images")
    _tiny_vae(tmp_path / "vae")
    decodes, real = [], fpdm.data.decode_image

    def counting(path, size, stop_at=None):
        decodes.append(path)
        if len(decodes) == stop_at:
            raise KeyboardInterrupt
        return real(path, size)

    monkeypatch.setattr(fpdm.data, "decode_image", lambda p, s: counting(p, s, stop_at=6))
    assert _encode(tmp_path, tmp_path / "parts") == 130  # interrupted in shard 1 (images 4, 5)
    manifest = json.loads((tmp_path / "parts" / "manifest.json").read_text())
    assert [s["index"] for s in manifest["shards"]] == [0] and not manifest["complete"]
    with pytest.raises(DataError, match=r"unfinished \(1 of 2 shards\)"):
        load_dataset(f"latents:{tmp_path / 'parts'}")
    decodes.clear()
    monkeypatch.setattr(fpdm.data, "decode_image", counting)
    assert _encode(tmp_path, tmp_path / "parts") == 0
    assert len(decodes) == 2  # only shard 1's two images
    decodes.clear()
    assert _encode(tmp_path, tmp_path / "whole") == 0 and len(decodes) == 6
    for name in ("latents-00000.npz", "latents-00001.npz"):
        with np.load(tmp_path / "parts" / name) as a, np.load(tmp_path / "whole" / name) as b:
            assert np.array_equal(a["latents"], b["latents"]) and np.array_equal(a["labels"], b["labels"])
    decodes.clear()
    assert _encode(tmp_path, tmp_path / "parts") == 0 and not decodes  # finished: nothing is decoded


def test_the_manifest_lists_finished_shards_and_refuses_other_settings(tmp_path, capsys):
    """Catches a manifest that does not say what each shard holds, and a resume with another --image-size or
    --seed that would mix two encodings in one folder."""
    pytest.importorskip("diffusers")
    _image_folder(tmp_path / "images")
    _tiny_vae(tmp_path / "vae")
    out = tmp_path / "latents"
    assert _encode(tmp_path, out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "fpdm-latents" and manifest["complete"] and manifest["shards_total"] == 2
    assert manifest["shards"] == [{"index": 0, "file": "latents-00000.npz", "rows": 4, "images": [0, 4]},
                                  {"index": 1, "file": "latents-00001.npz", "rows": 2, "images": [4, 6]}]  # fmt: skip
    assert manifest["shape"] == [4, 8, 8] and manifest["num_classes"] == 2 and manifest["num_images"] == 6
    assert manifest["settings"]["seed"] == 0 and manifest["settings"]["flip"] is False
    capsys.readouterr()
    assert _encode(tmp_path, out, "--seed", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was made with seed=0 (now 1)" in err[0]


def test_flip_encodes_each_image_and_its_mirror(tmp_path):
    """--flip doubles the set: catches flipped copies missing, mislabelled, or flipped along the wrong axis."""
    pytest.importorskip("diffusers")
    images = _image_folder(tmp_path / "images")
    vae = _tiny_vae(tmp_path / "vae")
    assert _encode(tmp_path, tmp_path / "flip", "--flip") == 0
    data = load_dataset(f"latents:{tmp_path / 'flip'}")
    assert len(data) == 12 and data.labels.tolist() == [0, 0, 0, 0, 0, 1, 0, 1, 1, 1, 1, 1]
    source = load_dataset(f"folder:{images}", image_size=16).images
    gen = _shard_generator(0)
    with torch.no_grad():
        x = torch.cat([source[0:2], source[0:2].flip(-1)])  # the first batch: two images, then their mirrors
        first = vae.encode(x).latent_dist.sample(generator=gen) * vae.config.scaling_factor
    torch.testing.assert_close(data.images[:4], first.half().float())


def _dits_center_crop_arr(pil_image, image_size):
    """DiT's train.py (from ADM's image_datasets.py), restated."""
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


@pytest.mark.parametrize("size", [(53, 31), (31, 70), (300, 140)])
def test_the_centre_crop_is_dits(tmp_path, size):
    """Non-square images, one large enough to be halved first: catches a crop before the resize (the old way),
    an off-by-one centre, or a missing box-filter halving."""
    from PIL import Image

    from fpdm.data import center_crop, decode_image

    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    expected = np.asarray(_dits_center_crop_arr(image, 16))
    assert np.array_equal(center_crop(image, 16), expected)
    image.save(tmp_path / "x.png")
    assert np.array_equal(decode_image(tmp_path / "x.png", 16), expected.transpose(2, 0, 1))


def test_each_rank_reads_exactly_its_slice_of_the_global_batch(tmp_path):
    """Two ranks simulated by calling with rank/world: catches ranks drawing their own batches (a 2-rank run
    would not see a 1-rank run's batch), overlapping or missing slices, and a loader that advances the
    checkpointed generator as it reads ahead (a resumed run would skip batches)."""
    from fpdm.data import StepIndices, batch_loader, open_dataset, step_indices

    data = open_dataset(f"folder:{_image_folder(tmp_path / 'images', sizes=((9, 7),) * 5)}", image_size=8)
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    one = [b[2] for b in batch_loader(data, StepIndices(gen, len(data), 6, steps=3))]
    assert torch.equal(gen.get_state(), state)  # the loader read ahead from a copy
    per_rank = [list(batch_loader(data, StepIndices(gen, len(data), 6, 3, rank, world=2))) for rank in (0, 1)]
    for step in range(3):
        assert torch.equal(torch.cat([per_rank[0][step][2], per_rank[1][step][2]]), one[step])
        for rank in (0, 1):
            x, y, idx = per_rank[rank][step]
            assert len(idx) == 3
            expected_x, expected_y = data.rows(idx)
            assert torch.equal(x, expected_x) and torch.equal(y, expected_y)
    g = torch.Generator().manual_seed(3)
    assert [step_indices(g, len(data), 6).tolist() for _ in range(3)] == [b.tolist() for b in one]


def test_workers_read_the_same_batches_and_report_a_bad_image_in_one_line(tmp_path):
    """--workers > 0: catches workers that read other rows or order, and a worker's error arriving as a
    multi-line traceback instead of the one-line message naming the file."""
    from fpdm.data import StepIndices, batch_loader, open_dataset

    data = open_dataset(f"folder:{_image_folder(tmp_path / 'images', sizes=((9, 7),) * 4)}", image_size=8)
    steps = StepIndices(torch.Generator().manual_seed(0), len(data), 4, steps=4)
    inline, forked = list(batch_loader(data, steps)), list(batch_loader(data, steps, workers=2))
    for a, b in zip(inline, forked, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    (tmp_path / "images" / "a" / "0.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as err:
        list(batch_loader(data, StepIndices(torch.Generator().manual_seed(0), len(data), 8, 4), workers=2))
    assert str(err.value).startswith("cannot read image ") and "0.png" in str(err.value)
    assert "\n" not in str(err.value)


def _shards(root, counts=(5, 3), shape=(4, 2, 2)):
    root.mkdir()
    rng = np.random.default_rng(0)
    for k, n in enumerate(counts):
        np.savez(root / f"latents-{k:05d}.npz", latents=rng.standard_normal((n, *shape)).astype(np.float16),
                 labels=rng.integers(0, 3, n), num_classes=3)  # fmt: skip
    return root


def test_latent_shards_read_only_the_indexed_rows(tmp_path):
    """Catches a loader that reads (or copies) whole shards, the old way that needed the data set in RAM, or one
    that puts rows in the wrong places of the batch."""
    from fpdm.data import LatentShards, ShardRows

    root = _shards(tmp_path / "z")
    data = LatentShards(root)
    assert all(isinstance(data.shard(k), ShardRows) for k in (0, 1))
    touched = {0: [], 1: []}

    class Recorder:
        def __init__(self, k, rows):
            self.k, self.rows = k, rows

        def __getitem__(self, rows):
            touched[self.k].append(np.asarray(rows).tolist())
            return self.rows[rows]

    whole = {k: np.load(root / f"latents-{k:05d}.npz")["latents"].astype(np.float32) for k in (0, 1)}
    for k in (0, 1):
        data.shard(k).reads = 0  # (opening shards without a manifest checked every row for NaN)
    data._shards = [Recorder(k, data.shard(k)) for k in (0, 1)]
    x, y = data.rows(torch.tensor([6, 1, 4, 1]))
    assert touched == {0: [[1, 1, 4]], 1: [[1]]}  # shard 0's rows 1 and 4 in file order, shard 1's row 1 (index 6)
    assert torch.equal(x, torch.from_numpy(np.stack([whole[1][1], whole[0][1], whole[0][4], whole[0][1]])))
    assert y.tolist() == data.labels[[6, 1, 4, 1]].tolist()
    assert data.shard(0).rows.reads == 3 and data.shard(1).rows.reads == 1  # of 5 and 3 rows
    import pickle

    assert pickle.loads(pickle.dumps(LatentShards(root).shard(0)))._fd is None  # a worker opens its own


def test_damaged_shards_and_manifests_are_one_line_errors(tmp_path):
    """Catches a traceback (or a silent mix) for a manifest that is not JSON, one listing a shard whose row count
    differs, and a NaN met in a batch."""
    from fpdm.data import LatentShards

    root = _shards(tmp_path / "z")
    manifest = {"format": "fpdm-latents", "shards_total": 2, "num_classes": 3, "complete": True,
                "shards": [{"index": 0, "file": "latents-00000.npz", "rows": 5},
                           {"index": 1, "file": "latents-00001.npz", "rows": 3}]}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert len(LatentShards(root)) == 8
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"latent manifest .*manifest.json is damaged \("):
        LatentShards(root)
    manifest["shards"][1]["rows"] = 4
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="holds 3 latents, its manifest says 4"):
        LatentShards(root)
    manifest["shards"][1]["rows"] = 3
    (root / "manifest.json").write_text(json.dumps(manifest))
    z = np.zeros((3, 4, 2, 2), np.float16)
    z[2, 1] = np.nan  # past the encoder's check: found when a batch reads it
    np.savez(root / "latents-00001.npz", latents=z, labels=np.zeros(3, int), num_classes=3)
    data = LatentShards(root)
    data.rows(torch.tensor([0, 5, 6]))
    with pytest.raises(DataError, match=r"non-finite values .* at index 7 \(in .*latents-00001.npz\)"):
        data.rows(torch.tensor([0, 7]))
    (root / "manifest.json").unlink()  # shards from before manifests: checked when opened
    with pytest.raises(DataError, match=r"non-finite values .* \(the first: index 7\)"):
        LatentShards(root)


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

"""Streaming data: host memory against data-set size, loader time against a training step, encoding speed.

Memory: a synthetic latent-shard set (ImageNet-256's latent shape, 4x32x32 float16, in shards and a
manifest as ``python -m fpdm.encode`` writes them) and a synthetic image folder (64x64 PNGs read at 64px), each at 1x
and 10x the size. A fresh Python process opens the set and streams 40 steps of batch 64 through
``fpdm.data.batch_loader`` (no workers: one process holds everything it reads), then reports its peak
resident memory (``ru_maxrss``). For contrast, the same process reading the set whole into memory
(``load_dataset``, the way every dataset was read before 0.2) is measured too. Streaming should cost the 10x
set at most ~20% more than the 1x set; reading whole grows with the set.

Time: the loader's time per step (in the training process, no workers: the worst case, nothing overlapped)
against a DiT-T/2 training step (forward, backward, AdamW) on the same batch, on this CPU.

Encoding: ``python -m fpdm.encode`` with a tiny random AutoencoderKL (the same architecture as the Stable
Diffusion VAE, 8 channels wide instead of 128-512): images/s of the pipeline (decode, centre crop, VAE,
fp16 shards, manifest). A real VAE is far slower; this measures what the pipeline around it costs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fpdm.data import StepIndices, batch_loader, open_dataset
from fpdm.diffusion import Diffusion
from fpdm.models import create_model

MEMORY = "peak host memory (RSS) streaming 40 steps of batch 64, against the data set's size"
TIME = "loader time per training step (batch 32, no workers) vs a DiT-T/2 training step, this CPU"
ENCODE = "python -m fpdm.encode with a tiny random VAE (64px images, batch 16), this CPU"

STEPS, BATCH = 40, 64
LATENT_ROWS, FOLDER_IMAGES = 2_000, 200  # the 1x sets

_MEASURE = """
import json, resource, sys, torch
from fpdm.data import StepIndices, batch_loader, load_dataset, open_dataset
name, mode, steps, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
kw = {"image_size": 64} if name.startswith("folder:") else {}
if mode == "stream":
    data = open_dataset(name, **kw)
    for _ in batch_loader(data, StepIndices(torch.Generator().manual_seed(0), len(data), batch, steps)):
        pass
else:
    data = load_dataset(name, **kw)
print(json.dumps({"rows": len(data), "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _latent_set(root, rows: int, shard: int = 1_000):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shards = []
    for k, start in enumerate(range(0, rows, shard)):
        n = min(shard, rows - start)
        np.savez(root / f"latents-{k:05d}.npz", latents=rng.standard_normal((n, 4, 32, 32)).astype(np.float16),
                 labels=rng.integers(0, 1000, n), num_classes=1000)  # fmt: skip
        shards.append({"index": k, "file": f"latents-{k:05d}.npz", "rows": n})
    manifest = {"format": "fpdm-latents", "shards_total": len(shards), "num_classes": 1000, "complete": True,
                "shards": shards}  # as python -m fpdm.encode writes it (less its settings)  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return f"latents:{root}"


def _image_folder(root, images: int, classes: int = 10):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return f"folder:{root}"


def _peak(name: str, mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", _MEASURE, name, mode, str(STEPS), str(BATCH)], capture_output=True,
                            text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["latents", "folder"])
def bench_memory_against_size(benchmark, report, tmp_path, kind):
    make, base = (_latent_set, LATENT_ROWS) if kind == "latents" else (_image_folder, FOLDER_IMAGES)
    names = {scale: make(tmp_path / f"x{scale}", base * scale) for scale in (1, 10)}
    benchmark.pedantic(lambda: None, rounds=1)
    peaks = {(scale, mode): _peak(names[scale], mode) for scale in (1, 10) for mode in ("stream", "whole")}
    for mode in ("stream", "whole"):
        for scale in (1, 10):
            peak = peaks[scale, mode]
            report.add(MEMORY, data=kind, mode=mode, size=f"{scale}x", rows=peak["rows"], peak_rss_mb=peak["peak_mb"],
                       vs_1x=f"{peak['peak_mb'] / peaks[1, mode]['peak_mb']:.2f}x")  # fmt: skip
    assert peaks[10, "stream"]["peak_mb"] <= 1.2 * peaks[1, "stream"]["peak_mb"]
    report.note(MEMORY, "stream: open_dataset + batch_loader (0.2); whole: load_dataset, every dataset before 0.2. "
                "Python + torch alone take most of the streaming figure.")  # fmt: skip


def _dit_step_seconds(channels: int, size: int, batch: int) -> float:
    torch.manual_seed(0)
    model = create_model("DiT-T/2", input_size=size, in_channels=channels, num_classes=10)
    diffusion = Diffusion.create(learn_sigma=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, channels, size, size), torch.randint(0, 10, (batch,))

    def step():
        loss = diffusion.training_losses(model, x, torch.randint(0, 1000, (batch,)), y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(3):
        step()
    return (time.perf_counter() - start) / 3


@pytest.mark.parametrize("kind", ["latents 4x32x32", "folder 3x32x32"])
def bench_loader_time_per_step(benchmark, report, tmp_path, kind):
    batch, steps = 32, 20
    if kind.startswith("latents"):
        data = open_dataset(_latent_set(tmp_path / "z", 20_000, shard=5_000))
    else:
        data = open_dataset(_image_folder(tmp_path / "img", 500), image_size=32)
    sampler = StepIndices(torch.Generator().manual_seed(0), len(data), batch, steps)
    start = time.perf_counter()
    benchmark.pedantic(lambda: [None for _ in batch_loader(data, sampler)], rounds=1, iterations=1)
    loader = (time.perf_counter() - start) / steps
    step = _dit_step_seconds(data.channels, data.image_size, batch)
    report.add(TIME, data=kind, rows=len(data), loader_ms=1e3 * loader, dit_t2_step_ms=1e3 * step,
               loader_share=f"{100 * loader / step:.1f}%")  # fmt: skip


@pytest.mark.parametrize("flip", [False, True], ids=["plain", "flip"])
def bench_encode_images_per_second(benchmark, report, tmp_path, flip):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL

    from fpdm.encode import cli

    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
    ).save_pretrained(tmp_path / "vae")  # fmt: skip
    images = _image_folder(tmp_path / "img", 128)
    out = tmp_path / "z"
    argv = ["--dataset", images, "--vae", str(tmp_path / "vae"), "--out", str(out), "--image-size", "64",
            "--batch-size", "16", "--shard-size", "64", "--workers", "0", "--quiet", "--device", "cpu"]  # fmt: skip
    start = time.perf_counter()
    assert benchmark.pedantic(lambda: cli(argv + ["--flip"] * flip), rounds=1, iterations=1) == 0
    seconds = time.perf_counter() - start
    rows = sum(s["rows"] for s in json.loads((out / "manifest.json").read_text())["shards"])
    report.add(ENCODE, flip=flip, source_images=128, latents=rows, images_per_s=128 / seconds,
               latents_per_s=rows / seconds)  # fmt: skip

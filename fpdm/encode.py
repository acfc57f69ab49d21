"""python -m fpdm.encode: images -> VAE latents, the way the paper trains at 256px.

Loads a diffusers ``AutoencoderKL`` from a local directory (or a hub id that is
already in the local cache: nothing is downloaded unless you allow it), encodes
a dataset and writes shards ``latents-00000.npz`` with ``latents`` (N, C, h, w)
float16, scaled by the VAE's ``scaling_factor``, ``labels`` (N,) and
``num_classes``. Train on them with ``--dataset latents:DIR``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from .checks import InputError, Parser, output_dir, run_cli, run_lock, seed
from .data import load_dataset
from .files import atomic_write

EncodeError = InputError  # the old name (before 0.2 its own class)


def load_vae(path: str, device: torch.device):
    """A diffusers AutoencoderKL from a local directory (the optional dependency ``diffusers``)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise InputError("the VAE needs diffusers: pip install 'fixedpoint[vae]'") from None
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load an AutoencoderKL from {path}: {str(err).splitlines()[0]}") from None
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, C, H/f, W/f) scaled latents (posterior samples, as DiT's training uses).

    The samples are drawn from ``generator`` (on the VAE's device), so encoding is reproducible.
    """
    scale = getattr(vae.config, "scaling_factor", 0.18215)
    device = next(vae.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        out.append((vae.encode(batch).latent_dist.sample(generator=generator) * scale).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def decode(vae, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1]."""
    scale = getattr(vae.config, "scaling_factor", 0.18215)
    device = next(vae.parameters()).device
    out = [vae.decode(latents[i : i + batch_size].to(device) / scale).sample.float().cpu()
           for i in range(0, len(latents), batch_size)]  # fmt: skip
    return torch.cat(out).clamp(-1, 1)


def main(args: argparse.Namespace) -> list[Path]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    data = load_dataset(args.dataset, split=args.split, data_dir=args.data_dir, image_size=args.image_size)
    if data.is_latent or data.channels != 3:
        raise InputError(f"the VAE encodes RGB images; {data.name} has {data.channels} channel(s)")
    vae = load_vae(args.vae, device)

    out = output_dir(args.out)
    with run_lock(out):  # one encoder per folder
        return _encode_into(out, data, vae, device, args)


def _encode_into(out: Path, data, vae, device: torch.device, args: argparse.Namespace) -> list[Path]:
    from rich.progress import track

    generator = torch.Generator(device).manual_seed(args.seed)
    written = []
    starts = range(0, len(data), args.shard_size)
    for index, start in enumerate(track(starts, description="encoding", disable=args.quiet)):
        latents = encode(vae, data.images[start : start + args.shard_size], args.batch_size, generator)
        path = out / f"latents-{index:05d}.npz"
        labels = data.labels[start : start + args.shard_size].numpy()
        # the temporary name is not *.npz: a crash leaves nothing the loader would read
        atomic_write(path, lambda fh, latents=latents, labels=labels: np.savez(
            fh, latents=latents.numpy().astype(np.float16), labels=labels, num_classes=data.num_classes))
        written.append(path)
    print(f"wrote {len(data)} latents of shape {tuple(latents.shape[1:])} in {len(written)} shard(s) to {out}")
    return written


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m fpdm.encode", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="folder:PATH (RGB images, one subfolder per class)")
    p.add_argument("--vae", required=True, help="local directory of a diffusers AutoencoderKL")
    p.add_argument("--out", required=True, help="directory for the latent shards")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=10000)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=seed, default=0, help="seed of the posterior samples, in [0, 2^32)")
    p.add_argument("--quiet", action="store_true")
    return p


def _run(args: argparse.Namespace) -> None:
    if args.batch_size < 1 or args.shard_size < 1 or args.image_size < 8:
        raise InputError("--batch-size and --shard-size must be >= 1 and --image-size >= 8")
    main(args)


def cli(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv, _run)


if __name__ == "__main__":
    sys.exit(cli())

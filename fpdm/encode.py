"""python -m fpdm.encode: images -> VAE latents, the way the paper trains at 256px.

Loads a diffusers ``AutoencoderKL`` from a local directory (or a hub id that is
already in the local cache: nothing is downloaded unless you allow it), encodes
a dataset read a batch at a time (a DataLoader whose workers decode the files)
and writes shards ``latents-00000.npz`` with ``latents`` (N, C, h, w) float16,
scaled by the VAE's ``scaling_factor``, ``labels`` (N,) and ``num_classes``,
each atomically, then ``manifest.json`` listing the finished shards: the same
command after an interrupt encodes only the rest. Train on them with
``--dataset latents:DIR`` (memory-mapped: only the rows of a batch are read).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .checks import InputError, Parser, output_dir, run_cli, run_lock, seed
from .data import LATENTS_FORMAT, MANIFEST, batch_loader, open_dataset, read_manifest
from .files import atomic_write, write_json

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
    data = open_dataset(args.dataset, split=args.split, data_dir=args.data_dir, image_size=args.image_size)
    if data.is_latent or data.channels != 3:
        raise InputError(f"the VAE encodes RGB images; {data.name} has {data.channels} channel(s)")
    vae = load_vae(args.vae, device)

    out = output_dir(args.out)
    with run_lock(out):  # one encoder per folder
        return _encode_into(out, data, vae, device, args)


# what makes an encoding: resuming with any of these changed is refused (its shards would not be one set)
SETTINGS = ("dataset", "split", "image_size", "vae", "seed", "flip", "shard_size")


def _shard_generator(seed: int, shard: int, device: torch.device) -> torch.Generator:
    """Shard ``shard``'s posterior draws: its own seed, so a resumed encoding writes what an uninterrupted one
    would have."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + shard)


def _encode_into(out: Path, data, vae, device: torch.device, args: argparse.Namespace) -> list[Path]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    settings = {k: getattr(args, k) for k in SETTINGS}
    copies = 2 if args.flip else 1
    total_shards = -(-len(data) // args.shard_size)
    manifest = read_manifest(out)
    if manifest is not None and manifest.get("settings") != settings:
        saved = manifest.get("settings") if isinstance(manifest.get("settings"), dict) else {}
        diff = [f"{k}={saved.get(k)!r} (now {settings[k]!r})" for k in SETTINGS if saved.get(k) != settings[k]]
        raise InputError(f"{out / MANIFEST} was made with {', '.join(diff) or 'other settings'}: use the same "
                         "settings to resume, or another --out")  # fmt: skip
    if manifest is None:
        manifest = {"format": LATENTS_FORMAT, "settings": settings, "num_images": len(data), "copies": copies,
                    "shards_total": total_shards, "num_classes": data.num_classes, "shards": [],
                    "complete": False}  # fmt: skip
    done = {s["index"] for s in manifest["shards"] if (out / s["file"]).is_file()}
    manifest["shards"] = [s for s in manifest["shards"] if s["index"] in done]  # a listed shard since removed: redone
    todo = [k for k in range(total_shards) if k not in done]
    if done:
        print(f"resuming: {len(done)} of {total_shards} shard(s) in {out} are finished", flush=True)

    def shard_range(k: int) -> range:
        return range(k * args.shard_size, min(len(data), (k + 1) * args.shard_size))

    batches = [torch.arange(r.start, r.stop)[i : i + args.batch_size] for k in todo for r in [shard_range(k)]
               for i in range(0, len(r), args.batch_size)]  # fmt: skip
    loader = batch_loader(data, batches, workers=args.workers, pin_memory=device.type == "cuda")
    progress = Progress(
        TextColumn("[bold]encoding"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]:.1f} images/s"),
        TimeRemainingColumn(), disable=args.quiet,
    )  # fmt: skip
    written, tic, rate = [], time.perf_counter(), 0.0
    with progress:
        finished = already = sum(len(shard_range(k)) for k in done) * copies
        task = progress.add_task("encode", total=len(data) * copies, completed=finished, rate=0.0)
        for k in todo:
            generator, latents, labels, size = _shard_generator(args.seed, k, device), [], [], len(shard_range(k))
            while sum(len(y) for y in labels) < size * copies:
                x, y, indices = next(loader)
                x = x.to(device, non_blocking=True)
                if args.flip:  # fast-DiT's way: each image and its mirror image
                    x, y, indices = torch.cat([x, x.flip(-1)]), torch.cat([y, y]), torch.cat([indices, indices])
                z = encode(vae, x, len(x), generator).half()
                finite = torch.isfinite(z.flatten(1)).all(dim=1)
                if not finite.all():
                    bad = int(indices[int((~finite).nonzero()[0])])
                    raise InputError(f"the VAE's latent of image {data.path(bad)} is not finite in float16 (NaN or "
                                     "Inf); check the image and the VAE")  # fmt: skip
                latents.append(z.numpy())
                labels.append(y.numpy())
                finished += len(z)
                rate = (finished - already) / max(time.perf_counter() - tic, 1e-9)
                progress.update(task, completed=finished, rate=rate)
            path = out / f"latents-{k:05d}.npz"
            block, names = np.concatenate(latents), np.concatenate(labels)
            # the temporary name is not *.npz: a crash leaves nothing the loader would read
            atomic_write(path, lambda fh, z=block, y=names: np.savez(fh, latents=z, labels=y,
                                                                       num_classes=data.num_classes))  # fmt: skip
            manifest["shards"] = sorted([*manifest["shards"], {"index": k, "file": path.name, "rows": len(names),
                                         "images": [shard_range(k).start, shard_range(k).stop]}],
                                        key=lambda s: s["index"])  # fmt: skip
            manifest["complete"] = len(manifest["shards"]) == total_shards
            manifest["shape"] = list(block.shape[1:])
            write_json(out / MANIFEST, manifest)  # after the shard: a listed shard is a finished one
            written.append(path)
    manifest["complete"] = True
    write_json(out / MANIFEST, manifest)
    print(f"wrote {len(written)} shard(s) ({sum(s['rows'] for s in manifest['shards'])} latents in "
          f"{total_shards} shard(s) in all) to {out}; {rate:.1f} images/s")  # fmt: skip
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
    p.add_argument("--shard-size", type=int, default=10000, help="source images per shard")
    p.add_argument("--flip", action="store_true", help="also encode each image mirrored (fast-DiT's set: 2x rows)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader processes that decode the images")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=seed, default=0, help="seed of the posterior samples, in [0, 2^32)")
    p.add_argument("--quiet", action="store_true")
    return p


def _run(args: argparse.Namespace) -> None:
    if args.batch_size < 1 or args.shard_size < 1 or args.image_size < 8 or args.workers < 0:
        raise InputError("--batch-size and --shard-size must be >= 1, --image-size >= 8 and --workers >= 0")
    main(args)


def cli(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv, _run)


if __name__ == "__main__":
    sys.exit(cli())
